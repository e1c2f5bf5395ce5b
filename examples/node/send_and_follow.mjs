// Publish one send job to wa-sender and follow its events until the message is read.
//
//   npm install --prefix examples/node
//   node examples/node/send_and_follow.mjs
//
// A worker, the Cloud API simulator and the webhook process must be running (see the README's
// quick start). The job is a utility template to a user who opted in. Settings come from the
// environment, as for the Python example: WA_AMQP_URL, WA_PREFIX, WA_PHONE_NUMBER_ID, WA_TO,
// WA_TIMEOUT_S. Exit codes: 0 read, 1 dead-lettered or failed, 2 timed out.

import { randomBytes } from "node:crypto";
import amqp from "amqplib";

const env = (name, fallback) => process.env[name] || fallback;
const AMQP_URL = env("WA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
const PREFIX = env("WA_PREFIX", "wa");
const PHONE_NUMBER_ID = env("WA_PHONE_NUMBER_ID", "106540352242922");
const TO = env("WA_TO", "+16505551234");
const TIMEOUT_S = Number(env("WA_TIMEOUT_S", "60"));

// What the job's story ends with.
const DONE = { "message.read": 0, "message.failed": 1, "job.dead_lettered": 1 };

const hex = (bytes) => randomBytes(bytes).toString("hex");

// A utility template the simulator's default scenario approves (order_update, 2 parameters).
const job = (jobId) => ({
  schema: "wa.send.v1",
  job_id: jobId,
  phone_number_id: PHONE_NUMBER_ID,
  to: TO,
  message: {
    type: "template",
    template: {
      name: "order_update",
      language: { code: "en_US" },
      components: [
        {
          type: "body",
          parameters: [
            { type: "text", text: "Jessica" },
            { type: "text", text: "#1042" },
          ],
        },
      ],
    },
  },
  category: "utility",
  metadata: { order_id: 1042, sent_by: "examples/node" },
});

async function main() {
  const connection = await amqp.connect(AMQP_URL);
  try {
    // Listen before publishing, so no event is missed: a private queue bound to the events
    // exchange (topic; the routing key is the event's name).
    const listen = await connection.createChannel();
    const { queue } = await listen.assertQueue("", { exclusive: true, autoDelete: true });
    for (const key of ["message.*", "job.*"]) {
      await listen.bindQueue(queue, `${PREFIX}.events`, key);
    }

    // Publish with confirms: once the broker confirms, it has the job on disk.
    const publish = await connection.createConfirmChannel();
    const jobId = `example-node-${hex(6)}`;
    const traceId = hex(16);
    publish.publish(
      `${PREFIX}.send`,
      // <lane>.<phone_number_id>: lanes are otp, transactional and bulk.
      `transactional.${PHONE_NUMBER_ID}`,
      Buffer.from(JSON.stringify(job(jobId))),
      {
        contentType: "application/json",
        persistent: true,
        mandatory: true,
        messageId: jobId,
        timestamp: Math.floor(Date.now() / 1000),
        // W3C trace context: the job is one trace from here to its read receipt.
        headers: { traceparent: `00-${traceId}-${hex(8)}-01` },
      },
    );
    await publish.waitForConfirms();
    console.log(`published ${jobId} (trace ${traceId})`);

    return await new Promise((resolve) => {
      const timer = setTimeout(() => {
        console.error(`no read receipt within ${TIMEOUT_S} s`);
        resolve(2);
      }, TIMEOUT_S * 1000);
      listen.consume(queue, (message) => {
        listen.ack(message);
        // A message holds one or more events of its routing key's kind: a JSON array.
        for (const event of JSON.parse(message.content.toString())) {
          if (event.job_id !== jobId) continue;
          const detail = event.wamid || event.error?.details || "";
          console.log(`${event.event.padEnd(20)} ${detail}`);
          if (event.event in DONE) {
            clearTimeout(timer);
            resolve(DONE[event.event]);
          }
        }
      });
    });
  } finally {
    await connection.close();
  }
}

process.exitCode = await main();
