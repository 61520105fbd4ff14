//! `schema.graphql` is the exported SDL: it must equal the code's, and describe everything.

use async_graphql::Request;
use serde_json::Value;

const SCHEMA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");

#[test]
fn schema_file_matches_the_code() {
    let sdl = syncgraph::graphql::sdl();
    if std::env::var("UPDATE_SCHEMA").is_ok_and(|v| v == "1") {
        std::fs::write(SCHEMA_FILE, &sdl).expect("write schema.graphql");
    }
    let committed = std::fs::read_to_string(SCHEMA_FILE).unwrap_or_default();
    assert!(
        committed == sdl,
        "schema.graphql is out of date with the code; refresh it with \
         `UPDATE_SCHEMA=1 cargo test --test api schema` (or `cargo run -- schema > schema.graphql`)"
    );
}

#[tokio::test]
async fn every_type_and_field_has_a_description() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("schema.db").display());
    let (db, _) = syncgraph::db::connect(&url, 1).await.unwrap();
    let live = syncgraph::graphql::Live {
        broker: std::sync::Arc::new(syncgraph::pubsub::Broker::new(0)),
        doorbell: syncgraph::changes::Doorbell::default(),
        announcer: syncgraph::changes::Announcer::default(),
        subscription_starts: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
    };
    let writes = syncgraph::store::Writes::new(&db).0;
    let api = syncgraph::graphql::Api::new(
        db,
        writes,
        syncgraph::auth::JwtKeys::new(b"x", std::time::Duration::from_secs(60)),
        live,
        &syncgraph::config::Limits::DEFAULT.schema(),
    );
    let query = "{ __schema { types { name kind description fields { name description args { name description } } inputFields { name description } } } }";
    let response = api
        .execute(Request::new(query), syncgraph::auth::Viewer::Anonymous)
        .await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let data: Value = response.data.into_json().unwrap();
    let mut missing = Vec::new();
    for ty in data["__schema"]["types"].as_array().unwrap() {
        let name = ty["name"].as_str().unwrap();
        if name.starts_with("__") || ["String", "Int", "Boolean", "ID", "Float"].contains(&name) {
            continue;
        }
        if ty["description"].as_str().is_none_or(str::is_empty) {
            missing.push(name.to_owned());
        }
        for key in ["fields", "inputFields"] {
            for field in ty[key].as_array().into_iter().flatten() {
                let field_name = field["name"].as_str().unwrap();
                if field["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(format!("{name}.{field_name}"));
                }
                for arg in field["args"].as_array().into_iter().flatten() {
                    if arg["description"].as_str().is_none_or(str::is_empty) {
                        missing.push(format!(
                            "{name}.{field_name}({})",
                            arg["name"].as_str().unwrap()
                        ));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:?}");
}
