// A Node caller of kara-sessions as a Node team would write one: protos/ loaded at run time
// with @grpc/proto-loader, one channel per service reused for every call, and no deadline
// (grpc-js's default). Prints one JSON line per outcome for tests/api/test_node_client.py, and
// reads a refusal's reason as the README says (refusal.mjs).
//
//   node caller.mjs HOST:PORT PROTOS_DIR NOW_ISO
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { randomUUID } from "node:crypto";
import path from "node:path";
import { refusal } from "./refusal.mjs";

const [target, protos, nowIso] = process.argv.slice(2);
const files = ["sessions", "credits"].map((f) => path.join(protos, "kara/sessions/v1", `${f}.proto`));
const definition = protoLoader.loadSync(files, {
  includeDirs: [protos],
  keepCase: true,
  enums: String,
  defaults: true,
  longs: Number,
});
const v1 = grpc.loadPackageDefinition(definition).kara.sessions.v1;
const credentials = grpc.credentials.createInsecure();
const sessions = new v1.SessionService(target, credentials);
const credits = new v1.CreditService(target, credentials);

const call = (client, method, request) =>
  new Promise((resolve) =>
    client[method](request, (error, reply) =>
      resolve(error ? { code: grpc.status[error.code], details: error.details, error } : { code: "OK", reply }),
    ),
  );
const at = (hoursFromNow) => {
  const ms = Date.parse(nowIso) + hoursFromNow * 3600 * 1000;
  return { seconds: Math.floor(ms / 1000), nanos: 0 };
};
const say = (line) => console.log(JSON.stringify(line));

// The article's five rows: who cancels, how far ahead, whether the box is ticked.
const rows = [
  ["client >= 24h", "PARTY_CLIENT", 72, false],
  ["professional >= 24h", "PARTY_PROFESSIONAL", 72, false],
  ["client < 24h", "PARTY_CLIENT", 10, false],
  ["professional < 24h, ticked", "PARTY_PROFESSIONAL", 10, true],
  ["professional < 24h, not ticked", "PARTY_PROFESSIONAL", 10, false],
];
const client = `node-client-${randomUUID().slice(0, 8)}`;
const granted = await call(credits, "GrantCredits", { client_id: client, credits: 100, request_id: randomUUID() });
if (granted.code !== "OK") throw new Error(JSON.stringify(granted));
for (const [row, by, hours, charge] of rows) {
  const booked = await call(sessions, "BookSession", {
    client_id: client,
    professional_id: "node-pro",
    starts_at: at(hours),
    request_id: randomUUID(),
  });
  const cancelled = await call(sessions, "CancelSession", {
    session_id: booked.reply.session_id,
    cancelled_by: by,
    charge_client: charge,
    request_id: randomUUID(),
  });
  const payment = await call(sessions, "GetPayment", { session_id: booked.reply.session_id });
  say({
    row,
    code: cancelled.code,
    state: cancelled.reply?.session.state,
    payment: payment.reply?.state,
    section: payment.reply?.section,
  });
}

// An unknown enum number, as a newer or careless caller sends it.
const odd = await call(sessions, "ListPayments", { professional_id: "node-pro", section: 7 });
// Why: the README's recipe (refusal.mjs) reads the reason and the fields from the trailers.
const why = refusal(odd.error);
say({ row: "unknown enum", code: odd.code, details: odd.details, reason: why.reason, fields: why.field_violations });

// A burst without deadlines, above the server's worker count, on the one channel.
const burst = await Promise.all(
  Array.from({ length: 48 }, (_, i) =>
    i % 2
      ? call(sessions, "GetPayment", { session_id: "no-such-session" })
      : call(sessions, "BookSession", {
          client_id: client,
          professional_id: "node-pro",
          starts_at: at(100 + i),
          request_id: randomUUID(),
        }),
  ),
);
const counted = {};
for (const { code } of burst) counted[code] = (counted[code] ?? 0) + 1;
say({ row: "burst", codes: counted });
sessions.close();
credits.close();
