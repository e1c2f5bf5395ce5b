//! The Cloud API simulator over real HTTP: Meta's validation and error bodies, both send limits,
//! the management endpoints and injected faults. No RabbitMQ or Redis needed.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_sender::simulator::{
    Fault, FaultRule, ParameterFormat, Scenario, SimNumber, SimTemplate, Simulator,
};

const NUMBER: &str = "106540352242922";
const WABA: &str = "102290129340398";
const TOKEN: &str = "sim-test-token";

struct Sim {
    sim: Simulator,
    http: reqwest::Client,
}

async fn start(tweak: impl FnOnce(&mut Scenario)) -> Sim {
    let mut scenario = Scenario::single(NUMBER, WABA, TOKEN);
    scenario.unknown_users.window_open = true;
    tweak(&mut scenario);
    let sim = Simulator::start(scenario, "127.0.0.1:0").await.unwrap();
    Sim {
        sim,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    }
}

impl Sim {
    async fn post_raw(&self, token: &str, body: String) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}/v23.0/{NUMBER}/messages", self.sim.base_url()))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn send(&self, body: Value) -> (StatusCode, Value) {
        self.post_raw(TOKEN, body.to_string()).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.sim.base_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }
}

fn text(to: &str) -> Value {
    json!({"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": "hello"}})
}

fn template(name: &str, params: Value) -> Value {
    json!({"messaging_product": "whatsapp", "to": "+16505550001", "type": "template",
           "template": {"name": name, "language": {"code": "en_US"},
                        "components": [{"type": "body", "parameters": params}]}})
}

/// Asserts Meta's error body: `error.code`, `type`, `error_data.details`, `fbtrace_id`.
fn assert_meta_error(answer: &(StatusCode, Value), code: i64) {
    let (status, body) = answer;
    let error = &body["error"];
    assert_eq!(error["code"], code, "{status} {body}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("(#{code})"))
    );
    assert_eq!(error["type"], "OAuthException");
    assert!(
        error["error_data"]["details"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    assert!(error["fbtrace_id"].as_str().is_some_and(|t| t.len() > 10));
}

#[tokio::test]
async fn requests_are_validated_as_meta_does() {
    let s = start(|_| {}).await;
    let answer = s
        .post_raw("wrong-token", text("+16505550001").to_string())
        .await;
    assert_eq!(answer.0, StatusCode::UNAUTHORIZED);
    assert_meta_error(&answer, 190);

    assert_meta_error(&s.post_raw(TOKEN, "{not json".into()).await, 100);
    assert_meta_error(
        &s.send(json!({"to": "+16505550001", "type": "text", "text": {"body": "x"}}))
            .await,
        131008,
    );
    assert_meta_error(
        &s.send(json!({"messaging_product": "whatsapp", "type": "text", "text": {"body": "x"}}))
            .await,
        131008,
    );
    assert_meta_error(&s.send(text("+1650555000x")).await, 131009);
    assert_meta_error(
        &s.send(json!({"messaging_product": "whatsapp", "to": "1", "type": "text"}))
            .await,
        131008,
    );
    assert_meta_error(&s.send(json!({"messaging_product": "whatsapp", "to": "1", "type": "text", "text": {"body": "x"}, "colour": "red"})).await, 100);
    assert_meta_error(
        &s.send(json!({"messaging_product": "whatsapp", "to": "1", "type": "fax", "fax": {}}))
            .await,
        100,
    );
    let long = "x".repeat(4097);
    assert_meta_error(&s.send(json!({"messaging_product": "whatsapp", "to": "1", "type": "text", "text": {"body": long}})).await, 131009);

    // Every message type the job schema allows is accepted when well-formed.
    let bodies = [
        json!({"type": "image", "image": {"link": "https://example.com/a.jpg", "caption": "c"}}),
        json!({"type": "document", "document": {"id": "1003383421387256", "filename": "a.pdf"}}),
        json!({"type": "audio", "audio": {"id": "1"}}),
        json!({"type": "video", "video": {"id": "1"}}),
        json!({"type": "sticker", "sticker": {"id": "1"}}),
        json!({"type": "location", "location": {"latitude": 37.7, "longitude": -122.4, "name": "HQ"}}),
        json!({"type": "contacts", "contacts": [{"name": {"formatted_name": "Ann"}}]}),
        json!({"type": "reaction", "reaction": {"message_id": "wamid.X", "emoji": "👍"}}),
        json!({"type": "interactive", "interactive": {"type": "button", "body": {"text": "ok?"},
              "action": {"buttons": [{"type": "reply", "reply": {"id": "y", "title": "Yes"}}]}}}),
    ];
    for (i, mut b) in bodies.into_iter().enumerate() {
        b["messaging_product"] = json!("whatsapp");
        b["to"] = json!(format!("+1650555{i:04}"));
        let (status, answer) = s.send(b.clone()).await;
        assert_eq!(status, StatusCode::OK, "{b} → {answer}");
        assert!(
            answer["messages"][0]["id"]
                .as_str()
                .unwrap()
                .starts_with("wamid.")
        );
    }
    let audit = s.sim.audit();
    assert_eq!(audit.accepted.len(), 9);
    assert_eq!(audit.error_count(190), 1);
    assert_eq!(audit.error_count(131008), 3);
}

#[tokio::test]
async fn templates_are_checked_against_the_registry() {
    let s = start(|sc| {
        let mut named = SimTemplate::new("welcome", "en_US", "UTILITY", "Hi {{first_name}}");
        named.parameter_format = ParameterFormat::Named;
        sc.templates.push(named);
        let mut paused = SimTemplate::new("paused_one", "en_US", "MARKETING", "Hi");
        paused.status = "PAUSED".into();
        sc.templates.push(paused);
        let mut disabled = SimTemplate::new("disabled_one", "en_US", "MARKETING", "Hi");
        disabled.status = "DISABLED".into();
        sc.templates.push(disabled);
        sc.templates.push(SimTemplate {
            waba_id: "999".into(),
            ..SimTemplate::new("foreign", "en_US", "UTILITY", "Hi")
        });
    })
    .await;
    let ann = json!([{"type": "text", "text": "Ann"}, {"type": "text", "text": "A-1"}]);
    let (status, answer) = s.send(template("order_update", ann.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["messages"][0]["message_status"], "accepted");

    let unknown = s.send(template("no_such", ann.clone())).await;
    assert_eq!(unknown.0, StatusCode::NOT_FOUND);
    assert_meta_error(&unknown, 132001);
    // Another WABA's template does not exist for this number.
    assert_meta_error(&s.send(template("foreign", json!([]))).await, 132001);
    let mut wrong_language = template("order_update", ann.clone());
    wrong_language["template"]["language"]["code"] = json!("de_DE");
    assert_meta_error(&s.send(wrong_language).await, 132001);
    assert_meta_error(
        &s.send(template(
            "order_update",
            json!([{"type": "text", "text": "Ann"}]),
        ))
        .await,
        132000,
    );
    assert_meta_error(
        &s.send(template(
            "welcome",
            json!([{"type": "text", "text": "Ann"}]),
        ))
        .await,
        132012,
    );
    let named = json!([{"type": "text", "parameter_name": "first_name", "text": "Ann"}]);
    assert_eq!(s.send(template("welcome", named)).await.0, StatusCode::OK);
    assert_meta_error(&s.send(template("paused_one", json!([]))).await, 132015);
    assert_meta_error(&s.send(template("disabled_one", json!([]))).await, 132016);
    assert_meta_error(
        &s.send(template(
            "order_update",
            json!([{"type": "text", "text": "Ann\tB"}, {"type": "text", "text": "1"}]),
        ))
        .await,
        132007,
    );
    // The OTP template needs its code in the body and in the copy-code button.
    let otp = json!({"messaging_product": "whatsapp", "to": "+16505550002", "type": "template",
        "template": {"name": "otp_code", "language": {"code": "en_US"}, "components": [
            {"type": "body", "parameters": [{"type": "text", "text": "123456"}]},
            {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "123456"}]}]}});
    assert_eq!(s.send(otp).await.0, StatusCode::OK);
}

#[tokio::test]
async fn throughput_is_enforced_in_a_sliding_second() {
    let s = start(|sc| sc.numbers[0].throughput_mps = Some(20)).await;
    // 60 sends as fast as possible to distinct users: exactly 20 fit in any 1 s window.
    let answers =
        futures::future::join_all((0..60).map(|i| s.send(text(&format!("+1650556{i:04}"))))).await;
    let accepted = answers.iter().filter(|a| a.0 == StatusCode::OK).count();
    let limited: Vec<_> = answers.iter().filter(|a| a.0 != StatusCode::OK).collect();
    assert!((1..=20).contains(&accepted), "{accepted} accepted");
    for a in &limited {
        assert_meta_error(a, 130429);
        assert_eq!(a.1["error"]["error_subcode"], 2494055);
    }
    // A second later the window has room again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.send(text("+16505579999")).await.0, StatusCode::OK);
    let audit = s.sim.audit();
    assert!(audit.numbers()[NUMBER].peak_per_second <= 20);
    assert_eq!(audit.error_count(130429) as usize, limited.len());
}

#[tokio::test]
async fn coexistence_numbers_send_20_per_second() {
    let s = start(|sc| {
        sc.numbers[0].throughput_mps = Some(500);
        sc.numbers[0].coexistence = true;
    })
    .await;
    let answers =
        futures::future::join_all((0..40).map(|i| s.send(text(&format!("+1650558{i:04}"))))).await;
    let accepted = answers.iter().filter(|a| a.0 == StatusCode::OK).count();
    assert!(accepted <= 20, "{accepted} accepted");
    assert!(s.sim.audit().error_count(130429) >= 20);
}

#[tokio::test]
async fn the_pair_rate_allows_a_burst_then_answers_131056() {
    let s = start(|sc| sc.pair_rate.burst = 5).await;
    let mut codes = Vec::new();
    for _ in 0..7 {
        let (status, body) = s.send(text("+16505550009")).await;
        codes.push(if status == StatusCode::OK {
            0
        } else {
            body["error"]["code"].as_i64().unwrap()
        });
    }
    assert_eq!(codes, [0, 0, 0, 0, 0, 131056, 131056]);
    // Another user is not affected.
    assert_eq!(s.send(text("+16505550010")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn templates_are_listed_with_fields_filters_and_cursor_paging() {
    let s = start(|sc| {
        // Beside the default scenario's six.
        for i in 0..4 {
            sc.templates.push(SimTemplate::new(
                &format!("promo_{i}"),
                "en_US",
                "MARKETING",
                "Hi {{1}}",
            ));
        }
    })
    .await;
    // 10 templates in all, pages of 4: 4 + 4 + 2, following `after` cursors.
    let mut names = Vec::new();
    let mut path = format!(
        "/v23.0/{WABA}/message_templates?limit=4&fields=name,status,category,language,components"
    );
    let mut pages = 0;
    loop {
        let (status, page) = s.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for t in page["data"].as_array().unwrap() {
            assert!(t["id"].is_string() && t["status"] == "APPROVED" && t["components"].is_array());
            names.push(t["name"].as_str().unwrap().to_owned());
        }
        match page["paging"]["next"].as_str() {
            Some(next) => {
                path = next
                    .strip_prefix(&s.sim.base_url())
                    .expect("absolute next")
                    .to_owned()
            }
            None => break,
        }
    }
    assert_eq!((pages, names.len()), (3, 10));
    let (_, marketing) = s
        .get(&format!(
            "/v23.0/{WABA}/message_templates?category=MARKETING&limit=100"
        ))
        .await;
    assert_eq!(marketing["data"].as_array().unwrap().len(), 7);
    let (_, one) = s
        .get(&format!(
            "/v23.0/{WABA}/message_templates?name=order_update"
        ))
        .await;
    let components = &one["data"][0]["components"];
    assert_eq!(components[0]["type"], "BODY");
    assert_eq!(
        components[0]["example"]["body_text"][0]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(one["data"][0]["parameter_format"], "POSITIONAL");
    let bad = s
        .get(&format!("/v23.0/{WABA}/message_templates?fields=colour"))
        .await;
    assert_meta_error(&bad, 100);
    assert_meta_error(&s.get("/v23.0/42/message_templates").await, 100);
}

#[tokio::test]
async fn the_phone_number_reports_throughput_quality_and_messaging_limit() {
    let s = start(|sc| {
        sc.numbers.push(SimNumber {
            coexistence: true,
            ..SimNumber::new("555", WABA)
        })
    })
    .await;
    let (status, n) = s
        .get(&format!("/v23.0/{NUMBER}?fields=throughput,quality_rating,whatsapp_business_manager_messaging_limit"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        n,
        json!({"id": NUMBER, "throughput": {"level": "STANDARD"}, "quality_rating": "GREEN",
                         "whatsapp_business_manager_messaging_limit": "TIER_250"})
    );
    let (_, default) = s.get(&format!("/v23.0/{NUMBER}")).await;
    assert!(default["display_phone_number"].is_string() && default["verified_name"].is_string());
    assert_meta_error(&s.get("/v23.0/777").await, 100);
}

#[tokio::test]
async fn injected_faults_look_like_the_network_and_meta_failing() {
    let s = start(|_| {}).await;
    s.sim.inject(FaultRule {
        job_id: None,
        fault: Fault::Reset,
        times: 1,
    });
    let reset = s
        .http
        .post(format!("{}/v23.0/{NUMBER}/messages", s.sim.base_url()))
        .bearer_auth(TOKEN)
        .json(&text("+16505550020"))
        .send()
        .await;
    let failed = match reset {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(failed, "a reset connection yields no usable answer");
    s.sim.inject(FaultRule {
        job_id: None,
        fault: Fault::BareStatus(502),
        times: 1,
    });
    let (status, body) = s.send(text("+16505550021")).await;
    assert_eq!((status, body), (StatusCode::BAD_GATEWAY, Value::Null));
    s.sim.inject(FaultRule {
        job_id: None,
        fault: Fault::Error {
            code: 131016,
            status: 500,
        },
        times: 1,
    });
    assert_meta_error(&s.send(text("+16505550022")).await, 131016);
    // Neither reset nor errors sent anything.
    assert_eq!(s.sim.audit().accepted.len(), 0);
    assert_eq!(s.send(text("+16505550023")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn shipped_scenarios_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let scenario = Scenario::load(path.to_str().unwrap()).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                !scenario.description.is_empty(),
                "{} needs a description",
                path.display()
            );
            loaded += 1;
        }
    }
    assert!(loaded >= 3, "only {loaded} scenarios in {}", dir.display());
}

#[tokio::test]
async fn the_simulator_is_alive_and_always_ready() {
    let sim = start(|_| {}).await;
    let alive = sim
        .http
        .get(format!("{}/healthz", sim.sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status(), StatusCode::OK);
    assert_eq!(alive.text().await.unwrap(), "ok");
    let ready = sim
        .http
        .get(format!("{}/readyz", sim.sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"ready": true, "draining": false})
    );
}
