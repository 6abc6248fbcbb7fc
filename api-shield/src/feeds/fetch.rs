//! Fetching a feed: HTTP(S) with conditional requests, or a local file; bounded in size
//! and time; checked (truncation, entry counts) before anything is applied.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use super::parse::{ParsedFeed, parse};
use crate::config::{FeedConfig, FeedFormat};

/// Where a feed comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Url(String),
    Path(PathBuf),
}

/// One fetch to make, with what the last good fetch said for conditional requests.
#[derive(Debug, Clone)]
pub struct FetchJob {
    pub name: String,
    pub source: Source,
    pub format: FeedFormat,
    pub timeout: Duration,
    pub max_bytes: u64,
    pub max_entries: usize,
    pub min_entries: usize,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl FetchJob {
    pub fn new(
        config: &FeedConfig,
        etag: Option<String>,
        last_modified: Option<String>,
    ) -> FetchJob {
        let source = match (&config.url, &config.path) {
            (Some(url), _) => Source::Url(url.0.clone()),
            (None, Some(path)) => Source::Path(path.clone()),
            (None, None) => unreachable!("config validation requires url or path"),
        };
        FetchJob {
            name: config.name.0.clone(),
            source,
            format: config.format,
            timeout: config.timeout.0,
            max_bytes: config.max_bytes.0,
            max_entries: config.max_entries.0 as usize,
            min_entries: config.min_entries.0 as usize,
            etag,
            last_modified,
        }
    }
}

/// A version that passed every check.
#[derive(Debug, Clone)]
pub struct GoodVersion {
    pub entries: HashSet<IpNet>,
    pub rejected: usize,
    pub examples: Vec<String>,
    pub host_bits_cleared: usize,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub bytes: usize,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The server said 304: the version in force is current.
    NotModified,
    Good(GoodVersion),
    /// Nothing changes; the last good version stays in force.
    Failed(String),
}

/// Log a progress line every this many bytes of a download.
const PROGRESS_EVERY: usize = 16 << 20;

pub async fn run(client: &reqwest::Client, job: &FetchJob) -> Outcome {
    let fetched = match &job.source {
        Source::Url(url) => {
            match tokio::time::timeout(job.timeout, fetch_http(client, job, url)).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {:?}", job.timeout)),
            }
        }
        Source::Path(path) => fetch_file(job, path).await,
    };
    let (body, etag, last_modified) = match fetched {
        Ok(None) => return Outcome::NotModified,
        Ok(Some(f)) => f,
        Err(e) => return Outcome::Failed(e),
    };
    let bytes = body.len();
    let (format, job2) = (job.format, job.clone());
    // Parsing a million lines takes a while: off the async thread.
    let parsed = match tokio::task::spawn_blocking(move || parse(&body, format)).await {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("parser failed: {e}")),
    };
    match check(&job2, parsed) {
        Ok(mut good) => {
            good.etag = etag;
            good.last_modified = last_modified;
            good.bytes = bytes;
            Outcome::Good(good)
        }
        Err(e) => Outcome::Failed(e),
    }
}

/// The checks a parsed version must pass before it replaces the one in force.
fn check(job: &FetchJob, parsed: ParsedFeed) -> Result<GoodVersion, String> {
    if let Some(declared) = parsed.declared_records
        && declared != parsed.records
    {
        return Err(format!(
            "truncated or corrupt: the feed declares {declared} records, {} were read",
            parsed.records
        ));
    }
    let n = parsed.entries.len();
    if n > job.max_entries {
        return Err(format!(
            "{n} entries, more than max_entries ({})",
            job.max_entries
        ));
    }
    if n < job.min_entries {
        return Err(format!(
            "{n} entries, fewer than min_entries ({})",
            job.min_entries
        ));
    }
    Ok(GoodVersion {
        entries: parsed.entries,
        rejected: parsed.rejected,
        examples: parsed.examples,
        host_bits_cleared: parsed.host_bits_cleared,
        etag: None,
        last_modified: None,
        bytes: 0,
    })
}

type Body = (Vec<u8>, Option<String>, Option<String>);

async fn fetch_http(
    client: &reqwest::Client,
    job: &FetchJob,
    url: &str,
) -> Result<Option<Body>, String> {
    let mut request = client.get(url).timeout(job.timeout);
    if let Some(etag) = &job.etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    if let Some(lm) = &job.last_modified {
        request = request.header(reqwest::header::IF_MODIFIED_SINCE, lm);
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (etag, last_modified) = (
        header(reqwest::header::ETAG),
        header(reqwest::header::LAST_MODIFIED),
    );
    let declared = response.content_length();
    if let Some(len) = declared
        && len > job.max_bytes
    {
        return Err(format!(
            "body of {len} bytes is over max_bytes ({})",
            job.max_bytes
        ));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(job.max_bytes) as usize);
    let started = Instant::now();
    let mut next_progress = PROGRESS_EVERY;
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            format!(
                "download failed after {} bytes: {}",
                body.len(),
                error_chain(&e)
            )
        })?;
        let Some(chunk) = chunk else { break };
        if (body.len() + chunk.len()) as u64 > job.max_bytes {
            return Err(format!("body is over max_bytes ({})", job.max_bytes));
        }
        body.extend_from_slice(&chunk);
        if body.len() >= next_progress {
            log::info!(
                "feed {}: {} MiB downloaded{} in {:.1} s",
                job.name,
                body.len() >> 20,
                declared
                    .map(|d| format!(" of {}", d >> 20))
                    .unwrap_or_default(),
                started.elapsed().as_secs_f64()
            );
            next_progress += PROGRESS_EVERY;
        }
    }
    if let Some(len) = declared
        && body.len() as u64 != len
    {
        return Err(format!("truncated: {} of {len} bytes", body.len()));
    }
    Ok(Some((body, etag, last_modified)))
}

async fn fetch_file(job: &FetchJob, path: &PathBuf) -> Result<Option<Body>, String> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.len() > job.max_bytes {
        return Err(format!(
            "{} is {} bytes, over max_bytes ({})",
            path.display(),
            meta.len(),
            job.max_bytes
        ));
    }
    let body = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some((body, None, None)))
}

/// reqwest's Display hides the cause (connection refused, timeout...): show the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(min: usize, max: usize) -> FetchJob {
        FetchJob {
            name: "t".into(),
            source: Source::Path("/dev/null".into()),
            format: FeedFormat::Auto,
            timeout: Duration::from_secs(1),
            max_bytes: 1024,
            max_entries: max,
            min_entries: min,
            etag: None,
            last_modified: None,
        }
    }

    #[test]
    fn entry_counts_and_truncation_are_checked() {
        let p = parse(b"192.0.2.0/24\n198.51.100.0/24\n", FeedFormat::Plain);
        assert!(check(&job(1, 10), p.clone()).is_ok());
        assert!(
            check(&job(3, 10), p.clone())
                .unwrap_err()
                .contains("fewer than min_entries (3)")
        );
        assert!(
            check(&job(0, 1), p)
                .unwrap_err()
                .contains("more than max_entries (1)")
        );
        let cut = parse(
            b"{\"cidr\":\"192.0.2.0/24\"}\n{\"type\":\"metadata\",\"records\":5}\n",
            FeedFormat::Auto,
        );
        assert!(
            check(&job(0, 10), cut)
                .unwrap_err()
                .contains("declares 5 records, 1 were read")
        );
    }
}
