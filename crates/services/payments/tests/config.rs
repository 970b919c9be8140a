//! `[payments]` settings: outage windows and ranges are checked, each mistake a
//! configuration error naming its key.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chassis::config::{HumanDuration, Source};
use payments::{Outage, Settings};

#[test]
fn outage_windows_parse() {
    let ok = |raw: &str, from: u64, length: u64| {
        assert_eq!(
            Outage::parse(raw).unwrap(),
            Outage {
                from: Duration::from_millis(from),
                length: Duration::from_millis(length),
            },
            "{raw}"
        );
    };
    ok("30s+10s", 30_000, 10_000);
    ok("0s+500ms", 0, 500);
    ok(" 1m + 1m 30s ", 60_000, 90_000);
    for bad in [
        "30s",
        "30s-10s",
        "+10s",
        "30s+",
        "ten+10s",
        "30s+0s",
        "30s+10s+5s",
        "",
    ] {
        assert!(Outage::parse(bad).is_err(), "{bad:?} should not parse");
    }
    let window = Outage::parse("30s+10s").unwrap();
    assert!(!window.contains(Duration::from_secs(29)));
    assert!(window.contains(Duration::from_secs(30)));
    assert!(window.contains(Duration::from_millis(39_999)));
    assert!(!window.contains(Duration::from_secs(40)));
}

#[test]
fn defaults_are_valid() {
    let settings = Settings::default();
    assert!(settings.validate().is_empty());
    assert_eq!(settings.latency_min, HumanDuration::millis(5));
    assert_eq!(settings.latency_max, HumanDuration::millis(20));
    assert_eq!(settings.decline_rate, 0.0);
}

#[test]
fn every_invalid_setting_names_its_key() {
    let settings = Settings {
        decline_rate: 1.5,
        latency_min: HumanDuration::millis(50),
        latency_max: HumanDuration::millis(10),
        outages: vec!["30s+10s".into(), "soon".into(), "1m+0s".into()],
        ..Settings::default()
    };
    let errors = settings.validate();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "payments.decline_rate",
            "payments.latency_max",
            "payments.outages",
            "payments.outages"
        ]
    );
    assert!(errors[2].problem.contains("`soon`"));
    assert!(errors[3].problem.contains("`1m+0s`"));
    assert!(payments::Provider::new(&settings).is_err());
}

#[test]
fn reads_from_the_environment() {
    chassis::config_section! {
        struct Root { payments: Settings }
    }
    let env = [
        ("BAZAAR_PAYMENTS__DECLINE_RATE", "0.25"),
        ("BAZAAR_PAYMENTS__LATENCY_MAX", "1s"),
        ("BAZAAR_PAYMENTS__OUTAGES", r#"["30s+10s", "2m+1m"]"#),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let root: Root = Source::load(None, env).unwrap().parse().unwrap();
    assert_eq!(root.payments.decline_rate, 0.25);
    assert_eq!(root.payments.latency_max, HumanDuration::secs(1));
    assert_eq!(root.payments.outage_windows().unwrap().len(), 2);
}
