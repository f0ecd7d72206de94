//! The API's client side (the CLI, tests, `cargo xtask run`): one HTTP/1.1
//! request per call over the UNIX socket with hyper, blocking the caller
//! (a current-thread runtime per call: the callers are synchronous tools,
//! and a call is rare next to what it asks for).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::{ErrorBody, MoveBody, Request, Response};

/// Longest a call waits for its answer (a move of a large MC VM is the
/// slowest request: a few hundred ms).
const TIMEOUT: Duration = Duration::from_secs(60);

/// The method, path and body of a request.
pub fn route(req: &Request) -> Result<(&'static str, String, Option<Vec<u8>>)> {
    let seg = |s: &str| -> Result<String> {
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            bail!("{s:?} is not a VM or task name (letters, digits, '_', '.', '-')");
        }
        Ok(s.to_string())
    };
    Ok(match req {
        Request::Status => ("GET", "/v1/status".into(), None),
        Request::Limits => ("GET", "/v1/limits".into(), None),
        Request::SetLimit { vm, direction, limit } => {
            ("PUT", format!("/v1/vms/{}/limits/{}", seg(vm)?, direction.as_str()), Some(serde_json::to_vec(limit)?))
        }
        Request::ClearLimit { vm, direction } => {
            ("DELETE", format!("/v1/vms/{}/limits/{}", seg(vm)?, direction.as_str()), None)
        }
        Request::Placement => ("GET", "/v1/placement".into(), None),
        Request::Decisions { after_tick } => ("GET", format!("/v1/decisions?after_tick={after_tick}"), None),
        Request::Move { task, to } => {
            ("POST", format!("/v1/placement/{}/move", seg(task)?), Some(serde_json::to_vec(&MoveBody { to: *to })?))
        }
        Request::Pin { task } => ("PUT", format!("/v1/placement/{}/pin", seg(task)?), None),
        Request::Unpin { task } => ("DELETE", format!("/v1/placement/{}/pin", seg(task)?), None),
    })
}

/// Ask the governor serving `socket`.
pub fn call(socket: &Path, req: &Request) -> Result<Response> {
    let (method, path, body) = route(req)?;
    let (code, bytes) = request(socket, method, &path, body)?;
    decode(req, code, &bytes).with_context(|| format!("{method} {path}: answer {code}"))
}

/// A connect that failed, said as a person needs it: no governor listens
/// there (the socket is missing or nobody answers it), and what to do.
fn not_listening(socket: &Path, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    let how = "start one with `governor run --config <file>` (its `socket` setting names the socket), or point \
               --socket at the one it serves";
    match e.kind() {
        NotFound => {
            anyhow::anyhow!("no governor is listening at {}: the socket does not exist; {how}", socket.display())
        }
        ConnectionRefused => anyhow::anyhow!(
            "no governor is listening at {}: the socket is there but nobody answers (a governor that stopped without \
             removing it?); {how}",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot connect to the governor at {}: permission denied (the socket is 0600, for root); run as root",
            socket.display()
        ),
        _ => anyhow::Error::new(e).context(format!("connect to the governor at {}", socket.display())),
    }
}

/// One raw request: the status code and the body.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("a runtime for the call")?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| not_listening(socket, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let has_body = body.is_some();
        let mut b = hyper::Request::builder().method(method).uri(path).header("host", "governor");
        if has_body {
            b = b.header("content-type", "application/json");
        }
        let req = b.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
            .await
            .with_context(|| format!("no answer within {TIMEOUT:?}"))??;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes().to_vec();
        drop(sender);
        // The connection ends with the request; its error (if any) is the
        // request's, already reported.
        let _ = conn.await;
        Ok((code, bytes))
    })
}

/// The typed answer to `req` from its status and body.
fn decode(req: &Request, code: u16, body: &[u8]) -> Result<Response> {
    if !(200..300).contains(&code) {
        let e: ErrorBody =
            serde_json::from_slice(body).with_context(|| format!("error body {:?}", String::from_utf8_lossy(body)))?;
        return Ok(Response { decisions: e.decision.map(|d| vec![*d]), ..Response::refused(code, e.error) });
    }
    let mut r = Response { code, ..Response::ok() };
    match req {
        Request::Status => r.status = Some(serde_json::from_slice(body)?),
        Request::Limits => r.limits = Some(serde_json::from_slice(body)?),
        Request::Placement => r.placement = Some(serde_json::from_slice(body)?),
        Request::Decisions { .. } => r.decisions = Some(serde_json::from_slice(body)?),
        Request::Move { .. } => r.decisions = Some(vec![serde_json::from_slice(body)?]),
        Request::SetLimit { .. } | Request::ClearLimit { .. } | Request::Pin { .. } | Request::Unpin { .. } => {}
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Side;
    use crate::qos::Direction;

    #[test]
    fn routes_name_the_resource_and_refuse_bad_names() {
        let (m, p, b) = route(&Request::Move { task: "log".into(), to: Side::Host }).expect("route");
        assert_eq!((m, p.as_str()), ("POST", "/v1/placement/log/move"));
        assert_eq!(b.as_deref(), Some(br#"{"to":"host"}"#.as_slice()));
        let (m, p, _) = route(&Request::ClearLimit { vm: "web".into(), direction: Direction::Ingress }).expect("route");
        assert_eq!((m, p.as_str()), ("DELETE", "/v1/vms/web/limits/ingress"));
        assert!(route(&Request::Pin { task: "../x".into() }).is_err());
        assert!(route(&Request::Pin { task: String::new() }).is_err());
    }

    #[test]
    fn errors_keep_the_message_and_a_failed_moves_record() {
        let r = decode(&Request::Status, 404, br#"{"error":"vm: no VM named \"x\""}"#).expect("decode");
        assert!(!r.ok);
        assert_eq!(r.code, 404);
        assert_eq!(r.error.as_deref(), Some("vm: no VM named \"x\""));
        assert!(decode(&Request::Status, 500, b"not json").is_err());
    }
}
