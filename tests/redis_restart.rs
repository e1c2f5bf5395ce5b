//! A Redis restart under a running worker: the Redis of the test's own (its own port, an
//! append-only file) goes away for two seconds mid-run. Jobs that meet it away wait (deferred,
//! never sent without their claim), the worker keeps running, and every job is sent exactly once.
//! Meanwhile its readiness names Redis as down, and comes back with it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::node::RedisNode;
use common::{spawn_app, text_job};
use wa_sender::health::Part;
use wa_sender::job::Lane;

const JOBS: usize = 300;

#[tokio::test]
async fn a_redis_restart_under_a_running_worker_loses_nothing_and_sends_nothing_twice() {
    let node = std::sync::Arc::new(RedisNode::start("redis-restart"));
    let url = node.url();
    let mut app = spawn_app("redis-restart", move |settings, scenario| {
        settings.redis.url = url;
        // Slow enough that the restart falls in the middle of the run.
        common::limit_number(settings, scenario, 40);
    })
    .await;
    let ids: BTreeSet<String> = (0..JOBS).map(|i| format!("redis-{i}")).collect();
    for id in &ids {
        app.enqueue_reply(Lane::Bulk, &text_job(id)).await;
    }
    app.start_worker();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while app.simulator.audit().accepted.len() < 40 {
        assert!(tokio::time::Instant::now() < deadline, "nothing was sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = app.health[0].clone();
    assert!(health.readiness().await.ready, "ready while running");
    let restarting = std::sync::Arc::clone(&node);
    let restart = tokio::task::spawn_blocking(move || restarting.restart(Duration::from_secs(2)));
    // Redis away: not ready, and Redis named as the part that is down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let state = health.readiness().await;
        if state.redis == Some(Part::Down) {
            assert!(!state.ready);
            assert_eq!(state.broker, Some(Part::Up));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis was never reported down: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restart.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !health.readiness().await.ready {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready again after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    app.wait_sent_once(&ids, Duration::from_secs(120)).await;
    let drained = app.stop_worker().await;
    assert_eq!(drained.abandoned, 0);
    app.cleanup().await;
    drop(node);
}
