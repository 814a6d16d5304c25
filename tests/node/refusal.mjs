// Why kara-sessions refused a call, read in Node (@grpc/grpc-js): the server sends a
// google.rpc.Status in the `grpc-status-details-bin` trailer, whose details hold an ErrorInfo (a
// stable `reason` to branch on, and metadata) and, for a bad request, a BadRequest (each field
// and what is wrong with it). The googleapis protos come from the google-proto-files package.
import { createRequire } from "node:module";
import path from "node:path";
import protobuf from "protobufjs";

const require = createRequire(import.meta.url);
const googleapis = path.dirname(require.resolve("google-proto-files/package.json"));
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(googleapis, target);
root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = root.lookupType("google.rpc.Status");

export function refusal(error) {
  const found = { code: error.code, message: error.details, reason: "", metadata: {}, field_violations: [] };
  const [bytes] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!bytes) return found;
  for (const detail of Status.decode(bytes).details) {
    const type = root.lookupType(detail.type_url.slice(detail.type_url.lastIndexOf("/") + 1));
    const message = type.toObject(type.decode(detail.value), { defaults: true });
    if (type.name === "ErrorInfo") Object.assign(found, { reason: message.reason, metadata: message.metadata });
    if (type.name === "BadRequest") found.field_violations = message.field_violations;
  }
  return found;
}
