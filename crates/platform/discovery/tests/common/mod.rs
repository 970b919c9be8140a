//! A registry with its checker, served on a free port.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;

use discovery::registry::{self, Registry, checks};

/// Starts a registry speaking both APIs; returns its base URL.
pub async fn start() -> String {
    let registry = Arc::new(Registry::new());
    checks::spawn(registry.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, registry::router(registry)).await });
    url
}

/// Sends `request`; its status.
pub async fn status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

/// Sends `request`; its JSON body.
pub async fn json<T: serde::de::DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
    request.send().await.unwrap().json().await.unwrap()
}
