//! Prometheus metrics: the text exposition format, and a small HTTP endpoint serving it.
//! The controller renders the text (it owns the maps); the endpoint only asks for it.

use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

/// A metrics scrape on its way to the controller.
pub type Scrape = oneshot::Sender<String>;

/// Builds the exposition text: one `# HELP`/`# TYPE` header per family, then its samples.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

/// One family's samples: label pairs and a value.
pub type Samples<'a> = Vec<(Vec<(&'a str, String)>, f64)>;

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: Samples<'_>) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.text.push_str(name);
            if !labels.is_empty() {
                self.text.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        self.text.push(',');
                    }
                    let _ = write!(self.text, "{k}=\"{}\"", escape(v));
                }
                self.text.push('}');
            }
            let _ = writeln!(self.text, " {}", format_value(value));
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Serves `GET /metrics` on `addr` until the process ends; each scrape asks the controller.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))
}

pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &scrapes).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn answer(
    req: &Request<hyper::body::Incoming>,
    scrapes: &mpsc::Sender<Scrape>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n".into());
    }
    let (tx, rx) = oneshot::channel();
    if scrapes.send(tx).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match rx.await {
        Ok(body) => text(StatusCode::OK, body),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_the_text_format() {
        let mut e = Exposition::default();
        e.family(
            "api_shield_packets_total",
            "counter",
            "Packets seen.",
            vec![(
                vec![("interface", "eth0".into()), ("reason", "passed".into())],
                12.0,
            )],
        );
        e.family(
            "api_shield_build_info",
            "gauge",
            "Build.",
            vec![(vec![("version", "a\"b".into())], 1.0)],
        );
        e.family(
            "api_shield_feed_last_success_timestamp_seconds",
            "gauge",
            "When.",
            vec![],
        );
        assert_eq!(
            e.finish(),
            "# HELP api_shield_packets_total Packets seen.\n# TYPE api_shield_packets_total counter\napi_shield_packets_total{interface=\"eth0\",reason=\"passed\"} 12\n# HELP api_shield_build_info Build.\n# TYPE api_shield_build_info gauge\napi_shield_build_info{version=\"a\\\"b\"} 1\n# HELP api_shield_feed_last_success_timestamp_seconds When.\n# TYPE api_shield_feed_last_success_timestamp_seconds gauge\n"
        );
        assert_eq!(format_value(0.5), "0.5");
    }
}
