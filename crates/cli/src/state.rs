//! The run state of a shop started by `bazaar up`: a JSON file in the data directory
//! that `bazaar ps` (and later `load`, `chaos`, `verify`) read to find the shop.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub name: String,
    pub pid: u32,
    pub url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub supervisor_pid: u32,
    /// `processes` or `monolith`.
    pub mode: String,
    pub gateway_url: String,
    pub processes: Vec<ProcessEntry>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("state.json")
}

impl RunState {
    /// The state of the shop last started from `data_dir`, if any.
    pub fn read(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path(data_dir)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes atomically (temp file + rename), so readers never see half a file.
    pub fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        let target = path(data_dir);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = target.with_extension(format!("json.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, target)?;
        Ok(())
    }

    pub fn remove(data_dir: &Path) {
        let _ = std::fs::remove_file(path(data_dir));
    }
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_ok()
}
