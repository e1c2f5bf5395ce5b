//! wa-sender: a high-throughput outbound send worker for the WhatsApp Business Cloud API.
//!
//! Map of the crate, in the order a job meets it:
//! - [`job`]: the send job schema `wa.send.v1`; decoding is validation.
//! - [`pipeline`]: `decode → pace → admit → send → settle` for one delivery, each stage a
//!   function with a type between it and the next.
//! - [`policy`]: pure rules: admission, template parameters, error classification, retry delays.
//! - [`registry`]: the template registry, synced from the management API into the store.
//! - [`cloud`]: the Cloud API edge (reqwest, Graph wire types, Meta's error body).
//! - `settlement`: how every delivery ends, shared by the pipeline and the webhook processor:
//!   events with trace context, dead letters with their headers, ack after confirm.
//! - [`broker`]: the queue edge (RabbitMQ via lapin, or in-memory): a queue per business
//!   number and lane, delay queues, events, dead letters.
//! - [`store`]: shared state (Redis, or in-memory): admission in one round trip, consent,
//!   windows, templates, campaigns, replica heartbeats.
//! - [`producer`]: what puts jobs on the queues: pipelined publisher confirms, trace context
//!   and message id per job; `wa-sender enqueue` (JSONL/CSV, validation, rejects, resume).
//! - [`worker`]: the consumer loops, one per business number: lane priorities, concurrency,
//!   graceful drain.
//! - [`event`]: events on `wa.events`.
//! - [`webhook`]: Meta's webhooks: the signed-POST receiver, the payload parser, the status machine.
//! - [`simulator`]: a Cloud API simulator that behaves like Meta's.
//! - [`admin`]: the operator's levers (HTTP API and CLI): campaigns, consent, CSV opt-in
//!   imports, care windows, dead letters (list, show, replay) and one job's state.
//! - [`app`]: one builder per process (`WorkerApp`, `WebhookApp`), shared by `main`, tests,
//!   benches and [`demo`]; [`server`] serves the HTTP APIs (admin, webhook receiver);
//!   [`health`] answers `/healthz` and `/readyz` for each long-running process, [`metrics`] its
//!   `/metrics` (every metric's name and labels).
//! - [`config`], [`ids`], [`telemetry`]: settings (converted once into a typed `Runtime`),
//!   identifier newtypes, logs and trace context.
//! - [`vocab`]: the shared vocabulary at the bottom (dead-letter reasons, deferral causes, lanes,
//!   categories, error codes, template definitions); it imports nothing else from the crate.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod admin;
pub mod app;
pub mod broker;
pub mod cloud;
pub mod config;
pub mod demo;
pub mod event;
pub mod health;
pub mod ids;
pub mod job;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod pricing;
pub mod producer;
pub mod registry;
pub mod server;
mod settlement;
pub mod simulator;
pub mod store;
pub mod telemetry;
pub mod vocab;
pub mod webhook;
pub mod worker;
