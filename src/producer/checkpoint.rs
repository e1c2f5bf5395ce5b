//! Where an interrupted `wa-sender enqueue` resumes: a small JSON file recording the last input
//! line whose publish, and every earlier one, the broker confirmed (rejected lines count as
//! done), and which run it belongs to (input, lane, campaign), so a different run never skips
//! lines on the strength of it.
//!
//! It is replaced atomically (written beside, then renamed), so a run killed mid-write leaves
//! the previous checkpoint, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A run's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// What the run is: input, lane and campaign.
    pub run: String,
    /// Every line up to and including this one is on the queue (or was rejected).
    pub line: u64,
}

/// Reading or writing the checkpoint failed, or it belongs to another run.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// It could not be read, parsed or written.
    #[error("checkpoint {path}: {detail}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        detail: String,
    },
    /// It records another run's progress (another input, lane or campaign).
    #[error(
        "checkpoint {path} belongs to another run ({found}, not {expected}); remove it or pass --restart"
    )]
    OtherRun {
        /// The file.
        path: String,
        /// The run it records.
        found: String,
        /// This run.
        expected: String,
    },
}

/// A checkpoint file.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
    run: String,
}

impl CheckpointFile {
    /// The checkpoint of `run` at `path`.
    pub fn new(path: PathBuf, run: String) -> Self {
        CheckpointFile { path, run }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Io {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        }
    }

    /// The last line done by an earlier run of the same arguments; `None` without a file.
    pub fn load(&self) -> Result<Option<u64>, CheckpointError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let checkpoint: Checkpoint = serde_json::from_str(&text).map_err(|e| self.io(e))?;
        if checkpoint.run != self.run {
            return Err(CheckpointError::OtherRun {
                path: self.path.display().to_string(),
                found: checkpoint.run,
                expected: self.run.clone(),
            });
        }
        Ok(Some(checkpoint.line))
    }

    /// Records that every line up to `line` is done.
    pub fn save(&self, line: u64) -> Result<(), CheckpointError> {
        let checkpoint = Checkpoint {
            run: self.run.clone(),
            line,
        };
        let mut next = self.path.clone().into_os_string();
        next.push(".next");
        let next = PathBuf::from(next);
        let body = serde_json::to_vec(&checkpoint).expect("a checkpoint serialises");
        std::fs::write(&next, body).map_err(|e| self.io(e))?;
        std::fs::rename(&next, &self.path).map_err(|e| self.io(e))
    }

    /// Forgets the progress (`--restart`).
    pub fn remove(&self) -> Result<(), CheckpointError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_read_back_only_by_its_own_run() {
        let dir = std::env::temp_dir().join(format!("wa-checkpoint-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobs.csv.checkpoint");
        let ours = CheckpointFile::new(path.clone(), "jobs.csv bulk spring".into());
        assert_eq!(ours.load().unwrap(), None);
        ours.save(1200).unwrap();
        ours.save(2400).unwrap();
        assert_eq!(ours.load().unwrap(), Some(2400));
        let other = CheckpointFile::new(path, "jobs.csv otp spring".into());
        assert!(matches!(
            other.load(),
            Err(CheckpointError::OtherRun { .. })
        ));
        ours.remove().unwrap();
        assert_eq!(ours.load().unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
