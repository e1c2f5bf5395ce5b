//! What keeping events costs the broker: the same events published (persistent, confirmed)
//! to a topic exchange with nothing bound (dropped: the old default), with a classic queue, a
//! quorum queue or a stream bound, then read back by one consumer from the start; RabbitMQ's
//! CPU per event for each, the kinds in rotating order. `--per-message N` puts N events in each
//! message, as a busy worker does (default 1).

use std::time::Instant;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::common::{option, publish_confirmed, services_cpu_us};
use crate::median;

/// Where the events go.
const KINDS: [&str; 4] = ["none", "classic", "quorum", "stream"];

pub async fn run() {
    let events: usize = option("--events").unwrap_or(50_000);
    let rounds: usize = option("--rounds").unwrap_or(3);
    let per: usize = option("--per-message").unwrap_or(1).max(1);
    let url = crate::settings("events").amqp.url;
    // A `message.accepted` event as the worker publishes it.
    let event = serde_json::to_vec(&serde_json::json!({
        "schema": "wa.event.v1",
        "event": "message.accepted",
        "job_id": "5f0c6b1e-6d0a-4c55-9a4e-2b8f0f2f6a11",
        "idempotency_key": "campaign-42/16505551234",
        "campaign_id": "campaign-42",
        "phone_number_id": "106540352242922",
        "to": "16505551234",
        "wamid": "wamid.HBgLMTY1MDU1NTEyMzQVAgARGBI3NDQ5NkY5RkE3QjA3QjQ3OEUA",
        "attempts": 1,
        "at": "2026-12-07T06:40:00.123Z",
    }))
    .unwrap();
    let body = wa_sender::event::write_message(std::iter::repeat_n(event.as_slice(), per));
    println!(
        "events: {events} events of {} bytes, {per} to a message, {rounds} rounds",
        event.len()
    );
    let mut publish: [Vec<f64>; 4] = Default::default();
    let mut read: [Vec<f64>; 4] = Default::default();
    let mut rate: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds {
        for k in 0..KINDS.len() {
            let kind = (round + k) % KINDS.len();
            let m = measure(&url, KINDS[kind], events / per, &body).await;
            let m = Measured {
                rate: m.rate * per as f64,
                publish_us: m.publish_us / per as f64,
                read_us: m.read_us / per as f64,
            };
            println!(
                "  round {}: {:<7} publish {:>6.0} events/s, RabbitMQ {:>5.1} µs per event published, {:>5.1} µs per event read",
                round + 1,
                KINDS[kind],
                m.rate,
                m.publish_us,
                m.read_us
            );
            publish[kind].push(m.publish_us);
            read[kind].push(m.read_us);
            rate[kind].push(m.rate);
        }
    }
    let none = median(&mut publish[0].clone());
    for kind in 0..KINDS.len() {
        let p = median(&mut publish[kind]);
        println!(
            "events: {:<7} RabbitMQ {:>5.1} µs per event published ({:.2}× dropped), {:>5.1} µs per event read, {:>6.0} events/s (medians)",
            KINDS[kind],
            p,
            p / none,
            median(&mut read[kind]),
            median(&mut rate[kind])
        );
    }
}

struct Measured {
    rate: f64,
    publish_us: f64,
    read_us: f64,
}

/// Publishes `events` messages of `body` and reads them back; figures per message.
async fn measure(url: &str, kind: &str, events: usize, body: &[u8]) -> Measured {
    let prefix = crate::settings("ev").amqp.prefix;
    let exchange = format!("{prefix}.events");
    let queue = format!("{prefix}.events.kept");
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    if kind != "none" {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), options, args)
            .await
            .expect("queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    let items = (0..events).map(|_| ("message.accepted".to_owned(), body));
    let (rabbit0, _) = services_cpu_us();
    let started = Instant::now();
    // Not mandatory: with nothing bound the broker drops each event, as it did by default.
    publish_confirmed(url, &exchange, items, 256, kind != "none").await;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    let (rabbit1, _) = services_cpu_us();
    let mut read_us = 0.0;
    if kind != "none" {
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut args = FieldTable::default();
        if kind == "stream" {
            args.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
        }
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "reader".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .expect("consume");
        for n in 1..=events {
            let delivery = consumer.next().await.expect("an event").expect("delivery");
            if n % 100 == 0 || n == events {
                delivery
                    .ack(BasicAckOptions { multiple: true })
                    .await
                    .unwrap();
            }
        }
        let (rabbit2, _) = services_cpu_us();
        read_us = (rabbit2 - rabbit1) as f64 / events as f64;
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    Measured {
        rate,
        publish_us: (rabbit1 - rabbit0) as f64 / events as f64,
        read_us,
    }
}
