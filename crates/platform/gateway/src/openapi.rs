//! `GET /openapi.json` at the gateway: the upstreams' documents merged, keeping only
//! the operations a route actually exposes, with bearer auth marked where required.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::future::join_all;
use serde_json::{Map, Value, json};

use crate::configuration::AuthPolicy;
use crate::proxy::Proxy;

pub async fn merged(State(proxy): State<Arc<Proxy>>) -> Response {
    let runtime = proxy.config.current();
    let services = runtime.table.services();
    let docs = join_all(
        services
            .iter()
            .map(|s| proxy.client.get_json::<Value>(s, "/openapi.json")),
    )
    .await;
    let mut paths = Map::new();
    let mut schemas = Map::new();
    let mut missing = Vec::new();
    for (service, doc) in services.iter().zip(docs) {
        let doc = match doc {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(upstream = %service, error = %e, "cannot fetch an upstream OpenAPI document");
                missing.push(service.clone());
                continue;
            }
        };
        if let Some(found) = doc
            .pointer("/components/schemas")
            .and_then(Value::as_object)
        {
            schemas.extend(found.clone());
        }
        let Some(found) = doc.get("paths").and_then(Value::as_object) else {
            continue;
        };
        for (path, item) in found {
            let Some(route) = runtime
                .table
                .route_for_doc(path)
                .filter(|r| *r.service == **service)
            else {
                continue;
            };
            let mut item = item.clone();
            if route.auth == AuthPolicy::Required
                && let Some(ops) = item.as_object_mut()
            {
                for op in ops.values_mut().filter_map(Value::as_object_mut) {
                    op.insert("security".into(), json!([{ "bearer": [] }]));
                }
            }
            paths.insert(path.clone(), item);
        }
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "API through the gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every operation the gateway routes, merged from the services' own documents."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } }
        }
    });
    if !missing.is_empty() {
        doc["x-missing-services"] = json!(missing);
    }
    axum::Json(doc).into_response()
}
