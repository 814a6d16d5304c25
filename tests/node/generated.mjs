// A TypeScript/JavaScript caller built from the generated code (protos/buf.gen.yaml's
// protoc-gen-es output, @bufbuild/protobuf) over @connectrpc/connect-node's gRPC transport, as
// a team starting from `make clients` would write one: one transport reused, a deadline on each
// call, enums and messages by their generated names, a refusal's reason read with the generated
// google.rpc.ErrorInfo. Prints one JSON line per outcome for tests/clients/test_clients.py.
//
//   node generated.mjs HOST:PORT NOW_ISO   (run beside gen/: the generated code)
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { ConnectError, Code, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { randomUUID } from "node:crypto";
import { CreditService } from "./gen/kara/sessions/v1/credits_pb.js";
import { Party, PaymentSection, PaymentState, SessionService, SessionState } from "./gen/kara/sessions/v1/sessions_pb.js";
import { ErrorInfoSchema, BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";

const [target, nowIso] = process.argv.slice(2);
const transport = createGrpcTransport({ baseUrl: `http://${target}`, defaultTimeoutMs: 10_000 });
const sessions = createClient(SessionService, transport);
const credits = createClient(CreditService, transport);
const say = (line) => console.log(JSON.stringify(line));
const hoursFromNow = (hours) => timestampFromDate(new Date(Date.parse(nowIso) + hours * 3600_000));

const client = `es-client-${randomUUID().slice(0, 8)}`;
await credits.grantCredits({ clientId: client, credits: 2, requestId: randomUUID() });
const booked = await sessions.bookSession({
  clientId: client,
  professionalId: "es-pro",
  startsAt: hoursFromNow(10),
  requestId: randomUUID(),
});
// Late, by the professional, box ticked: the article's fourth row.
const cancel = {
  sessionId: booked.sessionId,
  cancelledBy: Party.PROFESSIONAL,
  chargeClient: true,
  requestId: randomUUID(),
};
const { session, payment } = await sessions.cancelSession(cancel);
say({
  row: "professional < 24h, ticked",
  state: SessionState[session.state],
  payment: PaymentState[payment.state],
  section: PaymentSection[payment.section],
  startsAt: timestampDate(session.startsAt).toISOString(),
});

// A retry with the same request_id: the first answer again, marked as a replay.
let replayed = "";
const again = await sessions.cancelSession(cancel, { onTrailer: (t) => (replayed = t.get("kara-replayed") ?? "") });
say({ row: "retry", state: SessionState[again.session.state], replayed });

// Refusals, read as the generated google.rpc types.
const refused = async (call) => {
  try {
    await call();
    return { code: "OK" };
  } catch (error) {
    const e = ConnectError.from(error);
    const [info] = e.findDetails(ErrorInfoSchema);
    const [bad] = e.findDetails(BadRequestSchema);
    return {
      code: Code[e.code],
      reason: info?.reason ?? "",
      metadata: info?.metadata ?? {},
      fields: bad?.fieldViolations.map((v) => v.field) ?? [],
    };
  }
};
say({ row: "cancel twice", ...(await refused(() => sessions.cancelSession({ ...cancel, requestId: randomUUID() }))) });
say({
  row: "unknown enum",
  ...(await refused(() => sessions.listPayments({ professionalId: "es-pro", section: 7 }))),
});
say({ row: "no such session", ...(await refused(() => sessions.getSession({ sessionId: "no-such-session" }))) });
