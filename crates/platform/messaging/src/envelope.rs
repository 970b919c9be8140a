//! The CloudEvents 1.0 envelope every event travels in, with the request's
//! `traceparent` and correlation id carried as extension attributes.
//!
//! Structured mode (the whole event as one JSON document) works on every broker;
//! binary mode (attributes as `ce-*` headers, `data` as the payload) is used where a
//! broker has headers.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The only CloudEvents version produced and accepted.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of structured mode.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// One event. `subject` is the aggregate id (an order id): the default partition
/// key, so one aggregate's events stay in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339.
    pub time: String,
    pub datacontenttype: String,
    pub data: Value,
    /// W3C trace context of the operation that produced the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The correlation id of the request that produced the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
}

/// Why bytes are not a valid event: the attribute at fault and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CloudEvent: `{attribute}` {problem}")]
pub struct EnvelopeError {
    pub attribute: String,
    pub problem: String,
}

fn invalid(attribute: &str, problem: impl Into<String>) -> EnvelopeError {
    EnvelopeError {
        attribute: attribute.to_owned(),
        problem: problem.into(),
    }
}

impl CloudEvent {
    /// A new event with a fresh id (UUIDv7: sortable by creation) and the current
    /// time, carrying the current request's trace and correlation id if any.
    pub fn new(source: &str, ty: &str, subject: Option<&str>, data: Value) -> Self {
        let ctx = telemetry::context::current();
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id: uuid::Uuid::now_v7().to_string(),
            source: source.to_owned(),
            ty: ty.to_owned(),
            subject: subject.map(str::to_owned),
            time: OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_default(),
            datacontenttype: "application/json".to_owned(),
            data,
            traceparent: ctx.as_ref().map(|c| c.trace.to_header()),
            correlationid: ctx.map(|c| c.correlation_id.to_string()),
        }
    }

    /// The partition key: the subject, else the id.
    pub fn key(&self) -> &str {
        self.subject.as_deref().unwrap_or(&self.id)
    }

    /// When it happened.
    pub fn timestamp(&self) -> Option<OffsetDateTime> {
        OffsetDateTime::parse(&self.time, &Rfc3339).ok()
    }

    /// Structured mode: the event as one JSON document.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates structured mode, naming the first attribute at fault.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        // Straight into the event's fields: every consumer parses every delivery,
        // and a document map built first, then read again, cost as much as the
        // rest of the parse. A document this does not take whole is parsed again
        // by the checking path, which names what is wrong with it.
        if let Ok(wire) = serde_json::from_slice::<Wire>(bytes)
            && let Ok(event) = wire.into_event()
        {
            return Ok(event);
        }
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| invalid("(document)", format!("is not JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Validates a parsed JSON document as an event.
    pub fn from_value(value: Value) -> Result<Self, EnvelopeError> {
        let Value::Object(map) = &value else {
            return Err(invalid("(document)", "is not a JSON object"));
        };
        for attribute in ["specversion", "id", "source", "type", "time"] {
            match map.get(attribute) {
                None | Some(Value::Null) => return Err(invalid(attribute, "is missing")),
                Some(Value::String(s)) if s.is_empty() => {
                    return Err(invalid(attribute, "is empty"));
                }
                Some(Value::String(_)) => {}
                Some(_) => return Err(invalid(attribute, "must be a string")),
            }
        }
        if map.get("specversion").and_then(Value::as_str) != Some(SPEC_VERSION) {
            return Err(invalid(
                "specversion",
                format!("must be \"{SPEC_VERSION}\""),
            ));
        }
        serde_json::from_value::<Wire>(value)
            .map_err(|e| invalid("(document)", e.to_string()))?
            .into_event()
    }

    /// Binary mode: attributes as `ce-*` headers, `data` as the payload.
    pub fn to_binary(&self) -> (Vec<(String, String)>, Vec<u8>) {
        let mut headers = vec![
            ("ce-specversion".to_owned(), self.specversion.clone()),
            ("ce-id".to_owned(), self.id.clone()),
            ("ce-source".to_owned(), self.source.clone()),
            ("ce-type".to_owned(), self.ty.clone()),
            ("ce-time".to_owned(), self.time.clone()),
            ("content-type".to_owned(), self.datacontenttype.clone()),
        ];
        for (name, value) in [
            ("ce-subject", &self.subject),
            ("ce-traceparent", &self.traceparent),
            ("ce-correlationid", &self.correlationid),
        ] {
            if let Some(v) = value {
                headers.push((name.to_owned(), v.clone()));
            }
        }
        (headers, serde_json::to_vec(&self.data).unwrap_or_default())
    }

    /// Reads binary mode back; `header` looks a header up by (lowercase) name.
    pub fn from_binary<'a>(
        header: impl Fn(&str) -> Option<&'a str>,
        payload: &[u8],
    ) -> Result<Self, EnvelopeError> {
        let mut map = serde_json::Map::new();
        for (attribute, name) in [
            ("specversion", "ce-specversion"),
            ("id", "ce-id"),
            ("source", "ce-source"),
            ("type", "ce-type"),
            ("time", "ce-time"),
            ("subject", "ce-subject"),
            ("traceparent", "ce-traceparent"),
            ("correlationid", "ce-correlationid"),
            ("datacontenttype", "content-type"),
        ] {
            if let Some(v) = header(name) {
                map.insert(attribute.to_owned(), Value::String(v.to_owned()));
            }
        }
        let data = if payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(payload)
                .map_err(|e| invalid("data", format!("is not JSON: {e}")))?
        };
        map.insert("data".to_owned(), data);
        Self::from_value(Value::Object(map))
    }
}

/// Structured mode as it is read on the fast path: attributes that may be absent
/// or null, unknown ones ignored (as [`CloudEvent::from_value`] does).
#[derive(Deserialize)]
struct Wire {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    data: Option<Value>,
    traceparent: Option<String>,
    correlationid: Option<String>,
}

impl Wire {
    /// The event, with its optional attributes' defaults, or the first attribute
    /// at fault (in the order [`CloudEvent::from_value`] checks them).
    fn into_event(self) -> Result<CloudEvent, EnvelopeError> {
        fn required(attribute: &str, value: Option<String>) -> Result<String, EnvelopeError> {
            match value {
                None => Err(invalid(attribute, "is missing")),
                Some(v) if v.is_empty() => Err(invalid(attribute, "is empty")),
                Some(v) => Ok(v),
            }
        }
        let specversion = required("specversion", self.specversion)?;
        let event = CloudEvent {
            id: required("id", self.id)?,
            source: required("source", self.source)?,
            ty: required("type", self.ty)?,
            time: required("time", self.time)?,
            specversion,
            subject: self.subject,
            datacontenttype: self
                .datacontenttype
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "application/json".to_owned()),
            data: self.data.unwrap_or(Value::Null),
            traceparent: self.traceparent,
            correlationid: self.correlationid,
        };
        if event.specversion != SPEC_VERSION {
            return Err(invalid(
                "specversion",
                format!("must be \"{SPEC_VERSION}\""),
            ));
        }
        if event.timestamp().is_none() {
            return Err(invalid("time", "is not an RFC 3339 timestamp"));
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structured_and_binary_modes_round_trip() {
        let event = CloudEvent::new("/orders", "order.created", Some("o-1"), json!({"total": 5}));
        assert_eq!(CloudEvent::from_json(&event.to_json()).unwrap(), event);
        let (headers, payload) = event.to_binary();
        let back = CloudEvent::from_binary(
            |name| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            },
            &payload,
        )
        .unwrap();
        assert_eq!(back, event);
        assert_eq!(event.key(), "o-1");
        assert!(event.timestamp().is_some());
    }

    #[test]
    fn the_current_request_travels_with_the_event() {
        let ctx = telemetry::context::RequestContext::new_root();
        let event = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(telemetry::context::scope(ctx.clone(), async {
                CloudEvent::new("/orders", "order.created", None, Value::Null)
            }));
        assert_eq!(event.correlationid.as_deref(), Some(&*ctx.correlation_id));
        assert_eq!(
            event.traceparent.map(|t| t[3..35].to_owned()),
            Some(ctx.trace.trace_id_hex())
        );
    }

    #[test]
    fn the_direct_parse_reads_what_the_checking_path_reads() {
        let docs: [&[u8]; 7] = [
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z","data":{"b":1,"a":[true,null]}}"#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z","subject":null,"data":null,"ext":{"x":1}}"#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z","datacontenttype":"","traceparent":"tp","correlationid":"c"}"#,
            // A repeated attribute: the last one counts, as in the document map.
            br#"{"specversion":"1.0","id":"1","id":"2","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#,
            br#" {"data":"x","time":"2026-01-01T00:00:00+02:00","type":"t","source":"s","id":"1","specversion":"1.0","subject":"k"} "#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z","subject":5}"#,
            // A null optional attribute reads as absent on both paths.
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z","datacontenttype":null}"#,
        ];
        for doc in docs {
            let direct = CloudEvent::from_json(doc);
            let checked = serde_json::from_slice(doc)
                .map_err(|e| invalid("(document)", e.to_string()))
                .and_then(CloudEvent::from_value);
            assert_eq!(direct, checked, "{}", String::from_utf8_lossy(doc));
        }
        let wire: Wire = serde_json::from_slice(docs[0]).unwrap();
        assert!(
            wire.into_event().is_ok(),
            "a valid event takes the direct path"
        );
        let repeated = CloudEvent::from_json(docs[3]).unwrap();
        assert_eq!(repeated.id, "2");
    }

    #[test]
    fn invalid_documents_name_the_attribute() {
        let cases = [
            (&b"not json"[..], "(document)"),
            (br#"[1]"#, "(document)"),
            (br#"{"id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#, "specversion"),
            (br#"{"specversion":"0.3","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#, "specversion"),
            (br#"{"specversion":"1.0","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#, "id"),
            (br#"{"specversion":"1.0","id":"1","source":"s","type":7,"time":"2026-01-01T00:00:00Z"}"#, "type"),
            (br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#, "time"),
            (br#"{"specversion":"1.0","id":"","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#, "id"),
        ];
        for (bytes, attribute) in cases {
            let e = CloudEvent::from_json(bytes).unwrap_err();
            assert_eq!(e.attribute, attribute, "{}", String::from_utf8_lossy(bytes));
        }
        let ok = CloudEvent::from_json(
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(ok.data, Value::Null);
        assert_eq!(ok.datacontenttype, "application/json");
    }
}
