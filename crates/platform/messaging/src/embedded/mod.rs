//! The embedded broker: a durable log per topic ([`store`]), consumer groups over it
//! ([`groups`]), served over HTTP by the control plane ([`server`], protocol in
//! docs/events.md) and used by services through [`client::EmbeddedBus`].

pub mod client;
pub mod groups;
pub mod server;
pub mod store;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use groups::Groups;
use store::{LogConfig, TopicLog};

use crate::bus::check_name;

/// How often moved group positions are written.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// A topic's log and groups.
pub struct Topic {
    pub log: Arc<TopicLog>,
    pub groups: Groups,
}

/// Every topic under one directory.
pub struct Broker {
    config: LogConfig,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

impl Broker {
    /// Opens every topic found in `config.dir` (recovering their logs) and starts
    /// writing group positions in the background. Needs a Tokio runtime.
    pub fn open(config: LogConfig) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.dir)?;
        let broker = Arc::new(Self {
            config,
            topics: Mutex::new(HashMap::new()),
        });
        for entry in std::fs::read_dir(&broker.config.dir)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && check_name(&name).is_ok() {
                broker.topic(&name)?;
            }
        }
        let weak = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tick.tick().await;
                let Some(broker) = weak.upgrade() else { return };
                // Syncs and renames block: off the runtime's (often only) worker.
                let flushed = tokio::task::spawn_blocking(move || broker.flush())
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                if let Err(e) = flushed {
                    tracing::error!(error = %e, "could not save consumer group positions");
                }
            }
        });
        Ok(broker)
    }

    /// The topic, created on first use.
    pub fn topic(&self, name: &str) -> io::Result<Arc<Topic>> {
        check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let dir = self.config.dir.join(name);
        let log = TopicLog::open(name, dir.join("log"), &self.config)?;
        let groups = Groups::open(log.clone(), dir.join("groups"))?;
        let topic = Arc::new(Topic { log, groups });
        topics.insert(name.to_owned(), topic.clone());
        Ok(topic)
    }

    /// Topic names, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Writes every moved group position now (also done every 200 ms), each topic's
    /// log synced first: a saved position never covers records a power loss could
    /// still take (their offsets would be handed out again, and skipped).
    pub fn flush(&self) -> io::Result<()> {
        let topics: Vec<Arc<Topic>> = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for t in topics {
            // Positions are taken before the sync, so none covers a record written
            // after it.
            t.groups.flush_after(|| t.log.sync())?;
        }
        Ok(())
    }
}
