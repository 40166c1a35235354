//! Shared by the influxdb and timestream integration tests: a tiny HTTP/1.1 server started
//! inside the test (canned answers for the error paths real servers will not produce on
//! demand), running a pipeline in-process, and reading `file` sink output back.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sluice_core::config::parse_str;
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_core::topology;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request the server received (body gunzipped when it was gzip-encoded).
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    /// Path with query string.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Captured {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
}

/// A canned answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = dyn Fn(&Captured) -> Reply + Send + Sync;

/// A running test server; every request is kept in `requests`.
pub struct Server {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.requests.lock().expect("lock").clone()
    }
}

/// Starts a server on 127.0.0.1 (random port) answering with `handler`.
pub async fn start(handler: impl Fn(&Captured) -> Reply + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(Mutex::new(Vec::new()));
    let handler: Arc<Handler> = Arc::new(handler);
    let reqs = requests.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            let reqs = reqs.clone();
            tokio::spawn(async move {
                let _ = serve(stream, handler, reqs).await;
            });
        }
    });
    Server {
        addr,
        requests,
        task,
    }
}

async fn serve(
    mut stream: TcpStream,
    handler: Arc<Handler>,
    reqs: Arc<Mutex<Vec<Captured>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 64 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let gzipped = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-encoding") && v.contains("gzip"));
        if gzipped {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)?;
            body = out;
        }
        let captured = Captured {
            method,
            target,
            headers,
            body,
            at: Instant::now(),
        };
        let reply = handler(&captured);
        reqs.lock().expect("lock").push(captured);
        let mut out = format!(
            "HTTP/1.1 {} Canned\r\ncontent-length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        stream.write_all(out.as_bytes()).await?;
    }
}

/// The registry with this workspace's sources and sinks.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    sluice_sources::register(&mut registry);
    sluice_sinks::register(&mut registry);
    registry
}

/// Runs the pipeline in `toml` to completion (its sources must stop by themselves).
pub async fn run_pipeline(toml: &str) -> Result<(), String> {
    let config = parse_str(toml, Path::new("test.toml")).map_err(|e| {
        e.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    topology::run(config, &registry(), &Metrics::new(), None)
        .await
        .map_err(|e| e.to_string())
}

/// The JSON lines a `file` sink wrote (empty when it wrote nothing).
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).expect("file sink writes JSON lines"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

/// A name no earlier run used (servers keep data between test runs).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}
