//! Reload when the configuration files change (`[server] watch`, default on).
//!
//! The third reload trigger beside `SIGHUP` and `POST /admin/reload`, and the same code path:
//! it only calls [`Reloader::reload`]. `notify` (inotify on Linux) reports changes to
//! `gateway.toml` and to the `*.toml` files of `rules_dir`; editors save in bursts (a temporary
//! file, a rename, a second write), so changes are debounced: the reload starts once no change
//! has come for [`DEBOUNCE`]. The directories are watched, not the files, because a save by
//! rename replaces the file a watch would be on. Reading the files (the reload itself) is not a
//! change, so a reload never triggers another. `watch = false` turns the trigger off live; a
//! reload that moves `rules_dir` moves the watch with it.

use super::Reloader;
use async_trait::async_trait;
use notify::{EventKind, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Quiet time after the last change before the reload starts.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// The background service that reloads on file changes.
pub struct Watch(pub Arc<Reloader>);

/// What is watched for a configuration: the directory of `gateway.toml` and `rules_dir`.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Targets {
    config_file: PathBuf,
    rules_dir: PathBuf,
}

impl Targets {
    fn of(reloader: &Reloader) -> Targets {
        let config = reloader.config();
        Targets {
            config_file: absolute(&config.path),
            rules_dir: absolute(&config.cache.rules_dir),
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let parent = self
            .config_file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut dirs = vec![parent];
        if !dirs.contains(&self.rules_dir) {
            dirs.push(self.rules_dir.clone());
        }
        dirs
    }

    /// Whether a changed path is part of the configuration.
    fn concerns(&self, path: &Path) -> bool {
        path == self.config_file
            || (path.parent() == Some(self.rules_dir.as_path())
                && path.extension().is_some_and(|e| e == "toml"))
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Whether an event is a change to a file's content or name (not a read, not metadata).
fn is_change(kind: &EventKind) -> bool {
    use notify::event::ModifyKind;
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        _ => false,
    }
}

#[async_trait]
impl pingora::services::background::BackgroundService for Watch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut targets = Targets::of(&self.0);
        let shared = Arc::new(std::sync::Mutex::new(targets.clone()));
        // One pending signal is enough: whatever changed, the reload reads everything anew.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let seen = shared.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if !is_change(&event.kind) {
                return;
            }
            let targets = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if event.paths.iter().any(|p| targets.concerns(p)) {
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    "cannot watch the configuration files ({e}); reload with SIGHUP or POST /admin/reload"
                );
                return;
            }
        };
        let mut watched = Vec::new();
        rewatch(&mut watcher, &mut watched, &targets);
        // An edit between the start-up's read of the files and the watch above raised no
        // event: catch up once, now that later edits will be seen. (A loaded machine let a
        // test's edit fall in that gap, and the edit was never applied.)
        if self.0.config().watch && self.0.stale().await {
            let _ = self.0.reload("watch").await;
        }
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = shutdown.changed() => return,
            }
            // Debounce: wait for a quiet moment, so one save is one reload.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if !self.0.config().watch {
                continue;
            }
            // The outcome is logged, counted and audited by `reload`.
            let _ = self.0.reload("watch").await;
            let now = Targets::of(&self.0);
            if now != targets {
                targets = now;
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = targets.clone();
                rewatch(&mut watcher, &mut watched, &targets);
            }
        }
    }
}

/// Watches the directories `targets` needs and stops watching the others.
fn rewatch(watcher: &mut impl Watcher, watched: &mut Vec<PathBuf>, targets: &Targets) {
    let want = targets.dirs();
    for dir in watched.iter().filter(|d| !want.contains(d)) {
        let _ = watcher.unwatch(dir);
    }
    watched.retain(|d| want.contains(d));
    for dir in want {
        if watched.contains(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => watched.push(dir),
            Err(e) => tracing::warn!(
                "cannot watch {} ({e}); edits there need SIGHUP or POST /admin/reload",
                dir.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, GATEWAY};
    use super::*;
    use crate::invalidation::audit::Audit;
    use crate::proxy::{Live, Locks, Shared};
    use notify::event::{AccessKind, CreateKind, DataChange, MetadataKind, ModifyKind};
    use pingora::services::background::BackgroundService;
    use std::time::{Duration, Instant};

    /// An edit made after the configuration was read but before the watch exists raises no
    /// event; the watch catches up with it when it starts.
    #[tokio::test]
    async fn an_edit_made_before_the_watch_starts_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(load(
            dir.path(),
            GATEWAY,
            "[[rule]]\nname = \"one\"\nmatch = { path = \"/one\" }\n",
        ));
        let locks: &'static Locks = Box::leak(Box::default());
        let live: Shared = Arc::new(arc_swap::ArcSwap::from_pointee(
            Live::new(config.clone(), locks).unwrap(),
        ));
        let reloader = Arc::new(Reloader::new(
            dir.path().join("gateway.toml"),
            live,
            locks,
            Arc::new(Audit::new(None).unwrap()),
        ));
        // The edit lands before the watch is set up.
        std::fs::write(
            dir.path().join("rules/r.toml"),
            "[[rule]]\nname = \"two\"\nmatch = { path = \"/two\" }\n",
        )
        .unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let watch = Watch(reloader.clone());
        let watching = tokio::spawn(async move { watch.start(shutdown).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloader.config().hash == config.hash {
            assert!(
                Instant::now() < deadline,
                "the edit made before the watch started was not applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let names: Vec<String> = reloader
            .config()
            .rules
            .rules()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["two"]);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watching)
            .await
            .expect("the watch stops on shutdown")
            .unwrap();
    }

    #[test]
    fn only_the_configuration_files_concern_a_reload() {
        let t = Targets {
            config_file: PathBuf::from("/etc/aisle/gateway.toml"),
            rules_dir: PathBuf::from("/etc/aisle/rules"),
        };
        assert!(t.concerns(Path::new("/etc/aisle/gateway.toml")));
        assert!(t.concerns(Path::new("/etc/aisle/rules/vendors.toml")));
        // Editor droppings and other files beside them are not configuration.
        assert!(!t.concerns(Path::new("/etc/aisle/rules/.vendors.toml.swp")));
        assert!(!t.concerns(Path::new("/etc/aisle/rules/vendors.toml~")));
        assert!(!t.concerns(Path::new("/etc/aisle/other.toml")));
        assert!(!t.concerns(Path::new("/etc/aisle/rules/sub/deeper.toml")));
        assert_eq!(
            t.dirs(),
            vec![
                PathBuf::from("/etc/aisle"),
                PathBuf::from("/etc/aisle/rules")
            ]
        );
    }

    #[test]
    fn reads_and_metadata_are_not_changes() {
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Content
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Read)));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::AccessTime
        ))));
    }
}
