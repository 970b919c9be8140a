//! Extractors whose rejections are problem documents, so a client's mistake always
//! gets a clear 4xx: malformed JSON 400, wrong content type 415, over the body limit
//! 413, missing or mistyped fields 422 naming the field, a bad path or query 400.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;

use crate::problem::{FieldError, Problem};

/// JSON body extractor and response.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(Problem))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl From<JsonRejection> for Problem {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .with_detail("send the body as JSON with `Content-Type: application/json`"),
            JsonRejection::JsonSyntaxError(e) => Problem::bad_request(format!(
                "the body is not valid JSON: {}",
                inner_message(&e.body_text())
            )),
            JsonRejection::JsonDataError(e) => {
                let text = inner_message(&e.body_text());
                Problem::validation(vec![field_error_from_serde(&text)])
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            )
            .with_detail("the request body is larger than this service accepts"),
            other => Problem::bad_request(other.body_text()),
        }
    }
}

/// axum prefixes serde's message with its own sentence; keep serde's part.
fn inner_message(text: &str) -> String {
    text.split_once(": ")
        .map(|(_, rest)| rest)
        .unwrap_or(text)
        .to_owned()
}

/// Turns `items[0].quantity: invalid value ...` or `missing field `email`` into a
/// field error.
fn field_error_from_serde(text: &str) -> FieldError {
    let missing = text
        .split_once("missing field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name);
    if let Some(name) = missing {
        let prefix = text
            .split_once(": missing field")
            .map(|(p, _)| format!("{p}."))
            .unwrap_or_default();
        return FieldError::new(format!("{prefix}{name}"), "is required");
    }
    match text.split_once(": ") {
        Some((path, msg)) if !path.contains(' ') => FieldError::new(path, strip_position(msg)),
        _ => FieldError::new("", strip_position(text)),
    }
}

fn strip_position(msg: &str) -> String {
    msg.split(" at line ").next().unwrap_or(msg).to_owned()
}

/// Path extractor: an invalid id in a path is a 400 naming the parameter.
#[derive(Debug, Clone, Copy, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Problem))]
pub struct Path<T>(pub T);

impl From<PathRejection> for Problem {
    fn from(rejection: PathRejection) -> Self {
        Problem::bad_request(format!("invalid path parameter: {}", rejection.body_text()))
    }
}

/// Query extractor with a problem rejection.
#[derive(Debug, Clone, Copy, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Problem))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for Problem {
    fn from(rejection: QueryRejection) -> Self {
        Problem::bad_request(format!("invalid query string: {}", rejection.body_text()))
    }
}

/// The page size asked for with `?limit=`: `default` when absent, else it must be
/// within 1..=`max` (a 422 naming `limit` otherwise).
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32, Problem> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(Problem::validation(vec![FieldError::new(
            "limit",
            format!("must be between 1 and {max}"),
        )]))
    }
}

/// The `next` of a keyset-paged listing: the last item's key when the page came back
/// full (another may follow), `None` on the last page.
pub fn next_after<T>(items: &[T], limit: u32, key: impl Fn(&T) -> String) -> Option<String> {
    if items.len() == limit as usize {
        items.last().map(key)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_become_field_errors() {
        assert_eq!(
            field_error_from_serde("missing field `email` at line 1 column 2"),
            FieldError::new("email", "is required")
        );
        assert_eq!(
            field_error_from_serde("items[0]: missing field `quantity` at line 1 column 9"),
            FieldError::new("items[0].quantity", "is required")
        );
        assert_eq!(
            field_error_from_serde(
                "items[0].quantity: invalid value: integer `-1`, expected u32 at line 1 column 30"
            ),
            FieldError::new(
                "items[0].quantity",
                "invalid value: integer `-1`, expected u32"
            )
        );
    }

    #[test]
    fn page_limits_and_next_cursors() {
        assert_eq!(page_limit(None, 20, 100).ok(), Some(20));
        assert_eq!(page_limit(Some(100), 20, 100).ok(), Some(100));
        for bad in [0, 101] {
            let problem = page_limit(Some(bad), 20, 100)
                .err()
                .unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(problem.status_code(), StatusCode::UNPROCESSABLE_ENTITY);
        }
        let ids = ["a", "b", "c"];
        assert_eq!(
            next_after(&ids, 3, |i| (*i).to_owned()).as_deref(),
            Some("c")
        );
        assert_eq!(next_after(&ids, 4, |i| (*i).to_owned()), None);
    }
}
