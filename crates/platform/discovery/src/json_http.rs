//! The small HTTP/JSON client the Consul and etcd backends share (hyper, one pool).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::RegistryError;

#[derive(Clone, Debug)]
pub(crate) struct JsonHttp {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl JsonHttp {
    /// `base` like `http://127.0.0.1:8500` (a trailing `/` is ignored).
    pub(crate) fn new(base: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Watches idle for long stretches; keepalive notices a peer that vanished.
        connector.set_keepalive(Some(Duration::from_secs(15)));
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends the request and returns the response head once it arrives.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, RegistryError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e: http::uri::InvalidUri| RegistryError::Unreachable(e.to_string()))?;
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        let response = tokio::time::timeout(timeout, self.client.request(request))
            .await
            .map_err(|_| RegistryError::Unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = tokio::time::timeout(timeout, response.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(RegistryError::Refused { status, body });
        }
        Ok(response)
    }

    /// A whole request and response, within `timeout`.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(HeaderMap, Bytes), RegistryError> {
        let work = async {
            let response = self.send(method, path, body, timeout).await?;
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| RegistryError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((parts.headers, bytes))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| RegistryError::Unreachable(format!("no answer within {timeout:?}")))?
    }

    /// [`call`](Self::call) with a JSON answer.
    pub(crate) async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(HeaderMap, Value), RegistryError> {
        let (headers, bytes) = self.call(method, path, body, timeout).await?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Unreachable(format!("answer is not JSON: {e}")))?;
        Ok((headers, value))
    }
}
