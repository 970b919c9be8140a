//! The conformance suite against the machine's NATS server with JetStream
//! (`NATS_TEST_URL`, default `nats://127.0.0.1:4222`).
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::nats::{NatsBus, NatsConfig};

/// A bus in a namespace of its own (streams of one test never meet another's).
async fn bus() -> NatsBus {
    let url = std::env::var("NATS_TEST_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    NatsBus::connect(NatsConfig {
        url,
        prefix: format!(
            "bazaar_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ),
        partitions: 4,
        ..NatsConfig::default()
    })
    .await
    .unwrap()
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let bus = bus().await;
            conformance::$name(Arc::new(bus.clone())).await;
            // Leave the shared server as it was (a failed test leaves its streams
            // for inspection).
            assert!(bus.delete_namespace().await.unwrap() > 0);
        }
    )*};
}

conformance!(
    an_event_arrives_whole_with_its_key_offset_and_attempt,
    members_of_a_group_share_work_and_keep_each_keys_order,
    every_group_gets_every_event,
    what_a_dead_consumer_held_is_redelivered_to_another,
    a_nack_brings_the_message_back_after_the_delay_before_later_ones,
    a_group_replays_from_an_offset_or_a_time,
    malformed_bytes_arrive_marked_and_block_nothing,
);
