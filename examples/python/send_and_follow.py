"""Publish one send job to wa-sender and follow its events until the message is read.

    python3 -m pip install -r examples/python/requirements.txt
    python3 examples/python/send_and_follow.py            # a template to a user who opted in
    python3 examples/python/send_and_follow.py --reply    # wait for the user to write, answer

A worker, the Cloud API simulator and the webhook process must be running (see the README's
quick start). Without `--reply` the job is a utility template to a user who opted in, so the care
window does not matter. With `--reply` it first waits for the user's message (the webhook process
records it, which opens the 24 h care window, then publishes `inbound.message`), then answers
with free-form text, as a support agent would. Settings come from the environment:

    WA_AMQP_URL        amqp://guest:guest@127.0.0.1:5672/%2f
    WA_PREFIX          wa (the worker's amqp.prefix)
    WA_PHONE_NUMBER_ID 106540352242922 (a number the worker is configured with)
    WA_TO              +16505551234 (the recipient)
    WA_TIMEOUT_S       60

Exit codes: 0 read, 1 dead-lettered or failed, 2 timed out (waiting for the user or the receipt).
"""

import json
import os
import sys
import time
import uuid

import pika

AMQP_URL = os.environ.get("WA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
PREFIX = os.environ.get("WA_PREFIX", "wa")
PHONE_NUMBER_ID = os.environ.get("WA_PHONE_NUMBER_ID", "106540352242922")
TO = os.environ.get("WA_TO", "+16505551234")
TIMEOUT_S = float(os.environ.get("WA_TIMEOUT_S", "60"))

# What the job's story ends with.
DONE = {"message.read": 0, "message.failed": 1, "job.dead_lettered": 1}


def job(job_id, message, category, metadata):
    """A wa.send.v1 job from this number to the recipient."""
    return {
        "schema": "wa.send.v1",
        "job_id": job_id,
        "phone_number_id": PHONE_NUMBER_ID,
        "to": TO,
        "message": message,
        "category": category,
        "metadata": {**metadata, "sent_by": "examples/python"},
    }


def reply(job_id, text):
    """A free-form text answering the user's message: allowed only inside the care window."""
    body = f"Thanks for writing! About \"{text}\": your order #1042 ships today."
    return job(job_id, {"type": "text", "text": {"body": body}}, "service", {"ticket": "SUP-7731"})


def template(job_id):
    """A utility template the simulator's default scenario approves (order_update, 2 parameters)."""
    message = {
        "type": "template",
        "template": {
            "name": "order_update",
            "language": {"code": "en_US"},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": "Jessica"},
                        {"type": "text", "text": "#1042"},
                    ],
                }
            ],
        },
    }
    return job(job_id, message, "utility", {"order_id": 1042})


def main(answer):
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()

    # Listen before publishing, so no event is missed: a private queue bound to the events
    # exchange (topic; the routing key is the event's name).
    events = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    for key in ("message.*", "job.*", "inbound.message"):
        channel.queue_bind(queue=events, exchange=f"{PREFIX}.events", routing_key=key)
    deadline = time.monotonic() + TIMEOUT_S
    consumer = channel.consume(events, inactivity_timeout=1)

    # A message holds one or more events of its routing key's kind: a JSON array.
    pending = []

    def next_event():
        """The next event (its message acknowledged); None once the deadline has passed."""
        while not pending:
            item = next(consumer, None)  # (None, None, None) after a second without a message
            if item is None or time.monotonic() > deadline:
                return None
            method, _properties, body = item
            if method is not None:
                channel.basic_ack(method.delivery_tag)
                pending.extend(json.loads(body))
        return pending.pop(0)

    job_id = f"example-py-{uuid.uuid4().hex[:12]}"
    send = template(job_id)
    if answer:
        digits = TO.lstrip("+")
        print(f"waiting for a message from +{digits}", flush=True)
        while True:
            event = next_event()
            if event is None:
                print(f"+{digits} did not write within {TIMEOUT_S:.0f} s", file=sys.stderr)
                return 2
            if event["event"] == "inbound.message" and event.get("to", "").lstrip("+") == digits:
                text = (event.get("metadata") or {}).get("text") or ""
                print(f"inbound.message      {text}", flush=True)
                send = reply(job_id, text)
                break

    # Publish with confirms: once basic_publish returns, the broker has the job on disk.
    channel.confirm_delivery()
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    channel.basic_publish(
        exchange=f"{PREFIX}.send",
        # <lane>.<phone_number_id>: lanes are otp, transactional and bulk.
        routing_key=f"transactional.{PHONE_NUMBER_ID}",
        body=json.dumps(send).encode(),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=job_id,
            timestamp=int(time.time()),
            # W3C trace context: the job is one trace from here to its read receipt.
            headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
        ),
        mandatory=True,
    )
    print(f"published {job_id} (trace {trace_id})", flush=True)

    while True:
        event = next_event()
        if event is None:
            print(f"no read receipt within {TIMEOUT_S:.0f} s", file=sys.stderr)
            return 2
        if event.get("job_id") != job_id:
            continue
        detail = event.get("wamid") or (event.get("error") or {}).get("details", "")
        print(f"{event['event']:<20} {detail}", flush=True)
        if event["event"] in DONE:
            return DONE[event["event"]]


if __name__ == "__main__":
    sys.exit(main("--reply" in sys.argv[1:]))
