//! A small HTTP/1.1 server for feed tests, on 127.0.0.1 inside a test namespace: each path
//! serves what the test set (a body with an ETag, an error, a stall, a truncated body) and
//! every request is recorded with its headers.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Result;

use crate::netns::NetNs;

/// What a path answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this body and ETag; 304 if the request's If-None-Match is that ETag.
    Body { body: Vec<u8>, etag: Option<String> },
    /// This status with a short text body.
    Status(u16),
    /// Accepts the request and never answers (until the server stops).
    Stall,
    /// Declares `declared` bytes, sends `body`, then closes the connection.
    Truncated { body: Vec<u8>, declared: usize },
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HashMap<String, String>,
}

pub struct HttpServer {
    pub addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    /// Listens on 127.0.0.1 (an ephemeral port) in `netns`.
    pub fn start(netns: &NetNs) -> Result<HttpServer> {
        let listener = netns.run(|| TcpListener::bind("127.0.0.1:0"))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, st) = (routes.clone(), seen.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, s, st) = (r.clone(), s.clone(), st.clone());
                        thread::spawn(move || {
                            let _ = serve(stream, &r, &s, &st);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(HttpServer {
            addr,
            routes,
            seen,
            stop,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }

    pub fn body(&self, path: &str, body: &str, etag: Option<&str>) {
        self.set(
            path,
            Reply::Body {
                body: body.as_bytes().to_vec(),
                etag: etag.map(str::to_owned),
            },
        );
    }

    /// Requests seen for `path`, oldest first.
    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    stream: TcpStream,
    routes: &Mutex<HashMap<String, Reply>>,
    seen: &Mutex<Vec<Seen>>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let reply = routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or(Reply::Status(404));
    seen.lock().unwrap().push(Seen {
        path,
        headers: headers.clone(),
    });
    let mut out = stream;
    match reply {
        Reply::Body { body, etag } => {
            if etag.is_some() && headers.get("if-none-match") == etag.as_ref() {
                return out.write_all(b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n");
            }
            let etag_header = etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
            out.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{etag_header}Connection: close\r\n\r\n", body.len()).as_bytes())?;
            out.write_all(&body)
        }
        Reply::Status(code) => out.write_all(
            format!("HTTP/1.1 {code} Oops\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops")
                .as_bytes(),
        ),
        Reply::Stall => {
            // Hold the connection open without a byte of answer, bounded by the server's life.
            for _ in 0..600 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        Reply::Truncated { body, declared } => {
            out.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )?;
            out.write_all(&body)?;
            out.flush()
        }
    }
}

/// GET `path` from `addr` (e.g. 127.0.0.1:9477) inside `netns`: (status line, body).
pub fn get(netns: &NetNs, addr: &str, path: &str) -> Result<(String, String)> {
    use std::io::Read as _;
    let (addr, path) = (addr.to_owned(), path.to_owned());
    netns.run(move || -> Result<(String, String)> {
        let mut s = TcpStream::connect(&addr)?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        Ok((
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    })?
}

/// The value of `name{labels}` in a Prometheus text body.
pub fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series.strip_prefix(name)? == labels).then(|| value.parse().ok())?
    })
}
