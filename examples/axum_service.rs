//! An HTTP service (axum) that serves a Python function through a pool, with tower middleware
//! around the typed handle: a concurrency limit and a timeout.
//!
//! `POST /predict` with `{"id": 1, "values": [1.0, 2.0]}` answers `{"id": 1, "score": 6.5}`,
//! computed by `predict` in examples/workers/quickstart.py. A full queue answers 503, a
//! deadline 504, a Python exception 422. SIGTERM or Ctrl-C stops the server gracefully, then
//! the pool.
//!
//! ```text
//! PYVISOR_PYTHON=.venv/bin/python cargo run --example axum_service -- 127.0.0.1:3000
//! curl -s localhost:3000/predict -H 'content-type: application/json' -d '{"id":1,"values":[1,2]}'
//! ```
//!
//! The address is the first argument (default `127.0.0.1:3000`; port 0 picks a free one). The
//! example prints `listening on http://ADDR` once it accepts requests (tests/examples.rs reads
//! it and sends real requests).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tower::timeout::error::Elapsed;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use pyvisor::{CallError, Function, Pool, PoolSpec};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Features {
    id: u32,
    values: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct Prediction {
    id: u32,
    score: f64,
}

/// The typed handle with its middleware: what every request goes through. Cloning it is cheap;
/// clones share the concurrency limit.
fn predict_service(
    predict: Function<Features, Prediction>,
) -> impl Service<Features, Response = Prediction, Error = BoxError, Future: Send> + Clone + Send + Sync + 'static {
    ServiceBuilder::new()
        // At most this many calls in the pool from this server; more wait here.
        .concurrency_limit(64)
        .timeout(Duration::from_secs(5))
        .service(predict)
}

/// The HTTP routes, over any service shaped like [`predict_service`]'s.
fn router<S>(predict: S) -> Router
where
    S: Service<Features, Response = Prediction, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    Router::new().route("/predict", post(handle::<S>)).with_state(predict)
}

async fn handle<S>(State(predict): State<S>, Json(features): Json<Features>) -> Result<Json<Prediction>, ApiError>
where
    S: Service<Features, Response = Prediction, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    // `ready` waits while the pool's queue is full (backpressure) instead of failing.
    let prediction = predict.oneshot(features).await.map_err(ApiError)?;
    Ok(Json(prediction))
}

/// A failed call as an HTTP response.
struct ApiError(BoxError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.downcast_ref::<CallError>() {
            Some(CallError::Overloaded { .. } | CallError::QueueTimeout { .. } | CallError::ShutDown { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Some(CallError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            Some(CallError::Python { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
            Some(_) => StatusCode::INTERNAL_SERVER_ERROR,
            None if self.0.is::<Elapsed>() => StatusCode::GATEWAY_TIMEOUT,
            None => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.0.to_string()).into_response()
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:3000".to_string());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/quickstart.py");
    let pool = Pool::start(PoolSpec::script(script).name("axum_service").workers(2).max_in_flight(4)).await?;
    // Checked against the workers' `hello` here: a typo fails at start, not per request.
    let predict = pool.function::<Features, Prediction>("predict")?;
    let app = router(predict_service(predict));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(stop_signal()).await?;

    pool.shutdown().await;
    println!("server stopped; pool shut down");
    Ok(())
}
