//! The HTTP API, a read-only subset of Limitador's:
//!
//! - `GET /status` → `200`, body `{"status":"ok"}`.
//! - `GET /limits/{namespace}` → JSON list of [`LimitJson`], sorted by name, window, conditions.
//! - `GET /counters/{namespace}` → JSON list of [`CounterJson`]: the live counters (those whose
//!   window has not expired), sorted by limit then variable values, each with the amount live
//!   reservations hold on it (`reserved`, this service's own field).
//! - `GET /metrics` → Prometheus text, see [`crate::metrics`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use limitador::counter::Counter;
use limitador::limit::{Limit, Namespace};
use serde::Serialize;

use crate::service::Core;

/// A limit as `GET /limits/{namespace}` shows it (Limitador's field names).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LimitJson {
    /// The limit's `id` from the limits file, if any.
    pub id: Option<String>,
    /// The namespace (the gRPC request's `domain`).
    pub namespace: String,
    /// Hits allowed per window.
    pub max_value: u64,
    /// Window length in seconds.
    pub seconds: u64,
    /// The limit's `name` from the limits file, if any.
    pub name: Option<String>,
    /// CEL conditions, sorted.
    pub conditions: Vec<String>,
    /// CEL variables, sorted.
    pub variables: Vec<String>,
}

impl From<&Limit> for LimitJson {
    fn from(limit: &Limit) -> Self {
        let mut conditions: Vec<String> = limit.conditions().into_iter().collect();
        conditions.sort();
        let mut variables: Vec<String> = limit.variables().into_iter().collect();
        variables.sort();
        Self {
            id: limit.id().map(str::to_string),
            namespace: limit.namespace().as_ref().to_string(),
            max_value: limit.max_value(),
            seconds: limit.seconds(),
            name: limit.name().map(str::to_string),
            conditions,
            variables,
        }
    }
}

/// A counter as `GET /counters/{namespace}` shows it (Limitador's shape: the limit is nested).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterJson {
    /// The limit this counter counts for.
    pub limit: LimitJson,
    /// The value of each of the limit's variables (CEL source → value) for this counter.
    pub set_variables: BTreeMap<String, String>,
    /// Hits left in the current window (`max_value` minus hits, 0 when past the max).
    pub remaining: Option<u64>,
    /// Whole seconds until the window resets.
    pub expires_in_seconds: Option<u64>,
    /// The amount live reservations hold on this counter (neither committed nor expired), as
    /// the service tracks them (see [`crate::reservations`]). Not a Limitador field.
    pub reserved: u64,
}

impl From<&Counter> for CounterJson {
    fn from(counter: &Counter) -> Self {
        Self {
            limit: counter.limit().into(),
            set_variables: counter.set_variables().clone(),
            remaining: counter.remaining(),
            expires_in_seconds: counter.expires_in().map(|d| d.as_secs()),
            reserved: 0,
        }
    }
}

/// The router of the HTTP API over a shared [`Core`].
pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/limits/{namespace}", get(limits))
        .route("/counters/{namespace}", get(counters))
        .route("/metrics", get(metrics))
        .with_state(core)
}

async fn status() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn limits(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
) -> Json<Vec<LimitJson>> {
    let mut limits: Vec<LimitJson> = core
        .limiter()
        .get_limits(&Namespace::from(namespace))
        .iter()
        .map(LimitJson::from)
        .collect();
    limits.sort_by(|a, b| {
        (&a.name, a.seconds, &a.conditions)
            .cmp(&(&b.name, b.seconds, &b.conditions))
            .then(a.cmp(b))
    });
    Json(limits)
}

async fn counters(
    State(core): State<Arc<Core>>,
    Path(namespace): Path<String>,
) -> axum::response::Response {
    match core.answer(
        core.limiter()
            .get_counters(&Namespace::from(namespace))
            .await,
    ) {
        Ok(counters) => {
            let held = core.held_by_counter();
            let mut counters: Vec<CounterJson> = counters
                .iter()
                .map(|c| CounterJson {
                    reserved: held.get(c).copied().unwrap_or(0),
                    ..CounterJson::from(c)
                })
                .collect();
            counters
                .sort_by(|a, b| (&a.limit, &a.set_variables).cmp(&(&b.limit, &b.set_variables)));
            Json(counters).into_response()
        }
        Err(e) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read counters: {}", e.message()),
        )
            .into_response(),
    }
}

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        core.render_metrics(),
    )
}
