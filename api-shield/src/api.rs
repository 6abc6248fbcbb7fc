//! The admin API: one JSON object per line over a Unix socket, one response line per request.
//! Only root (or members of the configured group, checked with SO_PEERCRED and
//! SO_PEERGROUPS) are served.

use std::{
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    events::SlotNames,
    explain::ProbeProtocol,
    lists::ListKind,
    trace::{TraceHub, TraceRecord},
};

/// Requests longer than this are refused (and the connection closed).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Adds a CLI entry; `ttl_secs` makes it expire.
    Add {
        list: ListKind,
        cidr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Removes the CLI's claim on an entry.
    Del {
        list: ListKind,
        cidr: String,
    },
    List {
        list: ListKind,
    },
    Stats {},
    Status {},
    Reload {},
    Feeds {},
    /// The `n` sources with the highest packet rate, measured over one second.
    Top {
        n: usize,
    },
    /// Fetch now (all feeds, or one); answered when the fetches are done.
    FeedsRefresh {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A live trace of packets from sources in `cidr`, for `secs` or `max` packets: the
    /// answer is a stream (see [`serve`]).
    Trace {
        cidr: String,
        secs: u64,
        max: u64,
    },
    /// Ends a trace session (the connection that holds it sends this; never a client).
    #[serde(skip)]
    TraceStop {
        session: usize,
    },
    /// The verdict a packet from `address` would get now, and why.
    Explain {
        address: String,
        #[serde(default)]
        protocol: ProbeProtocol,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(default)]
        syn: bool,
    },
}

/// Parses a request line strictly: serde does not refuse unknown keys on every variant of
/// an internally tagged enum, so keys the parsed request does not use are refused here.
pub fn parse_request(text: &str) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))?;
    if !value["op"].is_string() {
        return Err(
            "bad request: `op` must be a string naming the operation (add, del, list, stats, status, reload, feeds, feeds_refresh, top, explain, trace)"
                .to_owned(),
        );
    }
    let request: Request = serde_json::from_value(value.clone()).map_err(|e| {
        // serde's message for a tagged enum names the type expected, not the field.
        let field = value.as_object().and_then(|o| {
            o.iter()
                .find_map(|(k, v)| field_error(k, v).map(|e| format!("`{k}`: {e}")))
        });
        format!("bad request: {}", field.unwrap_or_else(|| e.to_string()))
    })?;
    let known = serde_json::to_value(&request).map_err(|e| format!("bad request: {e}"))?;
    if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
        // Optional fields are left out of `known` when they are absent or null.
        let allowed = |k: &str| {
            known.contains_key(k)
                || (matches!(k, "ttl_secs" | "reason") && matches!(request, Request::Add { .. }))
                || (k == "name" && matches!(request, Request::FeedsRefresh { .. }))
                || (k == "port" && matches!(request, Request::Explain { .. }))
        };
        if let Some(extra) = given.keys().find(|k| !allowed(k)) {
            return Err(format!("bad request: unknown field `{extra}`"));
        }
    }
    Ok(request)
}

/// Why a request field's value is not of its type, if it is not.
fn field_error(key: &str, value: &serde_json::Value) -> Option<serde_json::Error> {
    match key {
        "list" => ListKind::deserialize(value).err(),
        "cidr" => String::deserialize(value).err(),
        "ttl_secs" => Option::<u64>::deserialize(value).err(),
        "reason" | "name" => Option::<String>::deserialize(value).err(),
        "n" => usize::deserialize(value).err(),
        "address" => String::deserialize(value).err(),
        "secs" | "max" => u64::deserialize(value).err(),
        "protocol" => ProbeProtocol::deserialize(value).err(),
        "port" => Option::<u16>::deserialize(value).err(),
        "syn" => bool::deserialize(value).err(),
        _ => None,
    }
}

/// A response line: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            ok: true,
            result: Some(serde_json::to_value(result).unwrap_or_default()),
            error: None,
        }
    }

    pub fn err(message: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.to_string()),
        }
    }
}

/// A request on its way to the daemon's main loop, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Response>);

/// Who may use the socket.
#[derive(Debug, Clone)]
pub struct Access {
    pub group: Option<(String, u32)>,
}

impl Access {
    pub fn new(group: Option<&str>) -> Result<Access> {
        let group = match group {
            None => None,
            Some(name) => Some((name.to_owned(), group_id(name)?)),
        };
        Ok(Access { group })
    }

    /// Root, or a member of the admin group (primary or supplementary).
    fn check(&self, uid: u32, gid: u32, groups: &[u32]) -> Result<(), String> {
        if uid == 0 {
            return Ok(());
        }
        if let Some((name, admin_gid)) = &self.group {
            if gid == *admin_gid || groups.contains(admin_gid) {
                return Ok(());
            }
            return Err(format!(
                "permission denied: uid {uid} is neither root nor in group {name}"
            ));
        }
        Err(format!("permission denied: uid {uid} is not root"))
    }
}

fn group_id(name: &str) -> Result<u32> {
    let c = CString::new(name).context("group name")?;
    // SAFETY: getgrnam returns a pointer into static storage or null; we read gr_gid only.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        bail!("admin.group: no group named `{name}`");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

/// The peer's supplementary groups as the socket recorded them when it connected
/// (SO_PEERGROUPS): unlike /proc/<pid>, they cannot belong to a process that took over
/// the peer's PID since.
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which holds them.
        let ret = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        if ret == 0 {
            groups.truncate(len as usize / size_of::<u32>());
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // ERANGE: more groups than room; `len` says how many bytes they need.
        if e.raw_os_error() != Some(libc::ERANGE) || len as usize <= groups.len() * 4 {
            return Err(e);
        }
        groups.resize(len as usize / size_of::<u32>(), 0);
    }
}

/// Binds the socket: directory 0750, socket 0600 (0660 and group-owned with a group).
/// A leftover socket nobody answers on is replaced; a live daemon's is never taken over.
pub fn bind(path: &Path, access: &Access) -> Result<UnixListener> {
    let dir = path.parent().context("socket path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let gid = access.group.as_ref().map(|(_, g)| *g);
    fs::set_permissions(dir, fs::Permissions::from_mode(0o750))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(dir, Some(0), Some(gid))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another api-shield daemon is serving {}; stop it first",
                path.display()
            );
        }
        fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))?;
    }
    Ok(listener)
}

/// What streamed answers (`trace`) read besides the controller: the records, and the
/// rules' names to show them with.
#[derive(Clone)]
pub struct Streams {
    pub trace_hub: TraceHub,
    pub slot_names: SlotNames,
}

/// Accepts connections and forwards their requests to `calls` until the channel closes.
/// Each request gets one response line, but `trace`: its response line (the session, or
/// why not) is followed by a line `{"trace":{...}}` per packet, and a last response line
/// `{"ok":true,"result":{"done":WHY,"shown":N,"missed":M}}`, after which the connection
/// closes. The trace ends at its time or count, when the client closes its end, or when
/// it sends anything.
pub async fn serve(
    listener: UnixListener,
    access: Access,
    calls: mpsc::Sender<Call>,
    streams: Streams,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (access, calls, streams) = (access.clone(), calls.clone(), streams.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &access, &calls, &streams).await {
                log::debug!("admin connection: {e:#}");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    access: &Access,
    calls: &mpsc::Sender<Call>,
    streams: &Streams,
) -> Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let groups = peer_groups(&stream).context("SO_PEERGROUPS")?;
    let (read, mut write) = stream.into_split();
    if let Err(refusal) = access.check(cred.uid(), cred.gid(), &groups) {
        log::warn!(
            "admin socket: refused uid {} (pid {:?})",
            cred.uid(),
            cred.pid()
        );
        write.write_all(&line(&Response::err(refusal))).await?;
        return Ok(());
    }
    let mut reader = tokio::io::BufReader::new(read);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64)
            .read_line(&mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if !buf.ends_with('\n') {
            write
                .write_all(&line(&Response::err(format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes or not newline-terminated"
                ))))
                .await?;
            return Ok(());
        }
        let response = match parse_request(buf.trim_end()) {
            Err(e) => Response::err(e),
            Ok(request @ Request::Trace { .. }) => {
                return trace(request, reader, write, calls, streams).await;
            }
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                calls
                    .send((request, tx))
                    .await
                    .context("daemon shutting down")?;
                rx.await
                    .unwrap_or_else(|_| Response::err("daemon shutting down"))
            }
        };
        write.write_all(&line(&response)).await?;
    }
}

/// Sends `request` to the controller and waits for its answer.
async fn ask(calls: &mpsc::Sender<Call>, request: Request) -> Result<Response> {
    let (tx, rx) = oneshot::channel();
    calls
        .send((request, tx))
        .await
        .context("daemon shutting down")?;
    Ok(rx
        .await
        .unwrap_or_else(|_| Response::err("daemon shutting down")))
}

/// Runs a `trace` session on this connection (see [`serve`]); the session ends in the
/// controller whatever ends it here.
async fn trace(
    request: Request,
    mut reader: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    calls: &mpsc::Sender<Call>,
    streams: &Streams,
) -> Result<()> {
    let Request::Trace { secs, max, .. } = request else {
        bail!("not a trace request");
    };
    // Subscribed before the filter is set, so no record of the session is missed.
    let mut records = streams.trace_hub.subscribe();
    let started = ask(calls, request).await?;
    write.write_all(&line(&started)).await?;
    let Some(result) = started.result.filter(|_| started.ok) else {
        return Ok(());
    };
    let session = result["session"].as_u64().unwrap_or(0) as usize;
    let net: ipnet::IpNet = result["cidr"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .context("the controller's trace answer lacks its prefix")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let (mut shown, mut lagged) = (0u64, 0u64);
    let mut scratch = [0u8; 64];
    let why = loop {
        tokio::select! {
            record = records.recv() => match record {
                Ok((interface, raw)) if net.contains(&raw.source) => {
                    let rule = streams
                        .slot_names
                        .read()
                        .ok()
                        .and_then(|n| n.get(raw.rule as usize).cloned())
                        .unwrap_or_else(|| format!("slot-{}", raw.rule));
                    let record = TraceRecord::new(
                        &raw,
                        &interface,
                        &rule,
                        crate::events::wall_time_ns(raw.time_ns),
                    );
                    let mut text = serde_json::to_vec(&serde_json::json!({ "trace": record }))?;
                    text.push(b'\n');
                    if write.write_all(&text).await.is_err() {
                        break "client gone";
                    }
                    shown += 1;
                    if shown >= max {
                        break "count";
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lagged += n,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break "daemon stopping",
            },
            () = tokio::time::sleep_until(deadline) => break "time",
            // The client closed its end (it was interrupted or killed), or asked to stop.
            _ = reader.read(&mut scratch) => break "client gone",
        }
    };
    let stopped = ask(calls, Request::TraceStop { session }).await?;
    let missed = stopped
        .result
        .as_ref()
        .and_then(|r| r["missed"].as_u64())
        .unwrap_or(0);
    if why != "client gone" {
        let done = Response::ok(serde_json::json!({
            "done": why,
            "shown": shown,
            "missed": missed + lagged,
        }));
        write.write_all(&line(&done)).await?;
    }
    Ok(())
}

fn line(response: &Response) -> Vec<u8> {
    let mut v = serde_json::to_vec(response).unwrap_or_default();
    v.push(b'\n');
    v
}

/// The client side: sends one request and returns the daemon's answer.
pub fn call(socket: &PathBuf, request: &Request) -> Result<Response> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the api-shield daemon at {} (is it running? are you root?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = serde_json::to_vec(request)?;
    req.push(b'\n');
    // A daemon that refuses the peer answers and closes without reading the request, so
    // the write may fail (EPIPE) with that answer already waiting: read it all the same.
    match stream.write_all(&req) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(e).context("sending the request"),
    }
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the daemon's answer")?;
    if reply.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&reply)
        .with_context(|| format!("the daemon's answer is not valid: {reply}"))
}

/// The client side of a streamed answer (`trace`): sends `request`, then hands each line
/// to `on_line` until it returns false or the daemon closes the connection.
pub fn stream(
    socket: &PathBuf,
    request: &Request,
    mut on_line: impl FnMut(&str) -> Result<bool>,
) -> Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the api-shield daemon at {} (is it running? are you root?)",
            socket.display()
        )
    })?;
    let mut req = serde_json::to_vec(request)?;
    req.push(b'\n');
    match stream.write_all(&req) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(e).context("sending the request"),
    }
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .context("reading the daemon's answer")?
            == 0
        {
            bail!("the daemon closed the connection");
        }
        if !on_line(line.trim_end())? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ones_are_refused() {
        let r = Request::Add {
            list: ListKind::Block,
            cidr: "192.0.2.0/24".into(),
            ttl_secs: Some(600),
            reason: Some("abuse".into()),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"op":"add","list":"block","cidr":"192.0.2.0/24","ttl_secs":600,"reason":"abuse"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        for bad in [
            r#"{"op":"explode"}"#,
            r#"{"op":"add","list":"block"}"#,
            r#"{"op":"stats","x":1}"#,
            r#"{"op":"add","list":"grey","cidr":"1.2.3.4"}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_root_or_the_admin_group_passes() {
        let root_only = Access { group: None };
        assert!(root_only.check(0, 0, &[]).is_ok());
        assert!(
            root_only
                .check(65534, 65534, &[])
                .unwrap_err()
                .contains("not root")
        );
        let with_group = Access {
            group: Some(("shield".into(), 4242)),
        };
        assert!(with_group.check(1000, 4242, &[]).is_ok());
        assert!(with_group.check(1000, 1000, &[27, 4242]).is_ok());
        assert!(
            with_group
                .check(1000, 1000, &[])
                .unwrap_err()
                .contains("group shield")
        );
    }
}
