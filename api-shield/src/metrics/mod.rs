//! Prometheus metrics: what the daemon exports (rendered at each scrape from the maps and
//! the controller's state, in `render`), the exposition, and a small HTTP endpoint.

mod render;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicI64, AtomicU64},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

/// A metrics scrape on its way to the controller.
pub type Scrape = oneshot::Sender<String>;

/// Builds the exposition through prometheus-client, in the Prometheus text format
/// (0.0.4): the families the controller reads from the maps at each scrape.
#[derive(Default)]
pub struct Exposition {
    registry: Registry,
}

/// One family's samples: label pairs and a value.
pub type Samples<'a> = Vec<(Vec<(&'a str, String)>, f64)>;

type Labels = Vec<(String, String)>;

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: Samples<'_>) {
        // prometheus-client adds a counter's `_total` and the help's full stop itself.
        let help = help.strip_suffix('.').unwrap_or(help);
        let samples: Vec<(Labels, f64)> = samples
            .into_iter()
            .map(|(labels, v)| {
                let labels = labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                (labels, v)
            })
            .collect();
        let whole = samples.iter().all(|(_, v)| v.fract() == 0.0 && *v >= 0.0);
        if kind == "counter" {
            let name = name.strip_suffix("_total").unwrap_or(name);
            if whole {
                let family = Family::<Labels, Counter<u64>>::default();
                for (labels, v) in &samples {
                    family.get_or_create(labels).inc_by(*v as u64);
                }
                self.registry.register(name, help, family);
            } else {
                let family = Family::<Labels, Counter<f64, AtomicU64>>::default();
                for (labels, v) in &samples {
                    family.get_or_create(labels).inc_by(*v);
                }
                self.registry.register(name, help, family);
            }
        } else if whole {
            let family = Family::<Labels, Gauge<i64, AtomicI64>>::default();
            for (labels, v) in &samples {
                family.get_or_create(labels).set(*v as i64);
            }
            self.registry.register(name, help, family);
        } else {
            let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
            for (labels, v) in &samples {
                family.get_or_create(labels).set(*v);
            }
            self.registry.register(name, help, family);
        }
    }

    pub fn finish(self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
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
            .header("content-type", prometheus_text::CONTENT_TYPE)
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
    fn families_render_in_the_prometheus_text_format() {
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
        e.family("api_shield_ratio", "gauge", "A share.", vec![(vec![], 0.5)]);
        // A family without samples has nothing to say.
        e.family(
            "api_shield_feed_last_success_timestamp_seconds",
            "gauge",
            "When.",
            vec![],
        );
        assert_eq!(
            e.finish(),
            "# HELP api_shield_packets_total Packets seen.\n# TYPE api_shield_packets_total counter\napi_shield_packets_total{interface=\"eth0\",reason=\"passed\"} 12\n# HELP api_shield_build_info Build.\n# TYPE api_shield_build_info gauge\napi_shield_build_info{version=\"a\\\"b\"} 1\n# HELP api_shield_ratio A share.\n# TYPE api_shield_ratio gauge\napi_shield_ratio 0.5\n"
        );
    }
}
