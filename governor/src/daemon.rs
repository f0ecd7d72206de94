//! `governor run`: sample on a timer, serve status on the control socket,
//! clean up (detach, unpin, remove the socket) on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::RwLock;

use crate::api::{parse_request, Request, Response, Status};
use crate::config::Config;
use crate::governor::Governor;

/// Run until SIGINT/SIGTERM, or until `stop_after` when given.
pub async fn run(cfg: Config, print: bool, stop_after: Option<Duration>) -> Result<()> {
    let mut gov = Governor::new(&cfg).context("starting the governor")?;
    tracing::info!(vms = cfg.vms.len(), pin_dir = %cfg.pin_dir.display(), "programs loaded and pinned");
    let shared = Arc::new(RwLock::new(Status {
        tick_ms: cfg.tick_ms,
        ..Status::default()
    }));
    let listener = bind(&cfg.socket)?;
    let _socket = RemoveOnDrop(cfg.socket.clone());
    tokio::spawn(serve(listener, shared.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut timer = tokio::time::interval(Duration::from_millis(cfg.tick_ms));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = 0u64;
    let deadline = tokio::time::sleep(stop_after.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut deadline => break,
        }
        let vms = match gov.tick() {
            Ok(v) => v.to_vec(),
            Err(e) => {
                // A VM whose cgroup went away must not stop the others'
                // telemetry; the error names the VM.
                tracing::warn!("sampling: {e:#}");
                continue;
            }
        };
        tick += 1;
        if print && tick > 1 {
            println!("tick {tick}\n{}", crate::sampler::table(&vms));
        }
        let mut s = shared.write().await;
        s.tick = tick;
        s.vms = vms;
        s.ooms = gov.ooms();
    }
    tracing::info!("shutting down: detaching programs and removing pins");
    drop(gov);
    Ok(())
}

fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // A socket left by a process that died refuses new binds; a live one
    // answers, and then we must not steal it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another governor is serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn serve(listener: UnixListener, shared: Arc<RwLock<Status>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(client(stream, shared.clone()));
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Longest request line accepted; anything longer is refused, not buffered.
const MAX_LINE: usize = 64 * 1024;

async fn client(stream: UnixStream, shared: Arc<RwLock<Status>>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Read at most MAX_LINE + 1 bytes of one line: a client cannot make
        // us buffer without bound.
        match (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let too_long = buf.len() > MAX_LINE && buf.last() != Some(&b'\n');
        let resp = if too_long {
            Response {
                ok: false,
                status: None,
                error: Some("request too long".into()),
            }
        } else {
            match std::str::from_utf8(&buf)
                .map_err(|e| e.to_string())
                .and_then(|l| parse_request(l.trim()))
            {
                Ok(Request::Status) => Response {
                    ok: true,
                    status: Some(shared.read().await.clone()),
                    error: None,
                },
                Err(e) => Response {
                    ok: false,
                    status: None,
                    error: Some(e),
                },
            }
        };
        let Ok(mut out) = serde_json::to_string(&resp) else {
            break;
        };
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() || too_long {
            break;
        }
    }
}
