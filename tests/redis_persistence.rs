//! A worker or webhook process refuses a Redis that keeps nothing on disk unless the operator
//! accepts the risk (`redis.allow_volatile`).

mod common;

use wa_sender::store::redis::RedisStore;

#[tokio::test]
async fn a_redis_that_keeps_nothing_is_refused_unless_allowed() {
    let prefix = common::unique_prefix("persist");
    let mut settings = common::settings(&prefix, "http://unused")
        .runtime()
        .unwrap();
    let store = RedisStore::connect(&settings.redis.url, &prefix)
        .await
        .unwrap_or_else(|e| panic!("integration tests need Redis: {e}"));
    // What this Redis does, asked directly (CI's and the development one keep nothing).
    let mut conn = redis::Client::open(settings.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let aof: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut conn)
        .await
        .unwrap();
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut conn)
        .await
        .unwrap();
    let persists = aof[1] == "yes" || !save[1].trim().is_empty();
    assert_eq!(store.persists().await.unwrap(), Some(persists));

    settings.redis.allow_volatile = false;
    let refused = wa_sender::app::check_persistence(&store, &settings).await;
    if persists {
        refused.expect("a Redis that persists is taken");
    } else {
        let e = refused.expect_err("a Redis that keeps nothing is refused");
        let message = format!("{e:#}");
        assert!(
            message.contains("keeps nothing on disk")
                && message.contains("redis.allow_volatile = true"),
            "{message}"
        );
    }
    settings.redis.allow_volatile = true;
    wa_sender::app::check_persistence(&store, &settings)
        .await
        .expect("allowed when the risk is accepted");
}
