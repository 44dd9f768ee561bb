//! The gateway's routes and lifecycle: [`build`] makes the shared
//! [`AppState`], [`routes`] serves it, [`run`] runs and drains it.
//!
//! Shutdown order: cancel → stop accepting and drain in-flight requests and
//! streams ([`crate::server`]'s graceful shutdown) → flush the event publisher (publish
//! or spool everything produced) → stop the key, quota and price watches.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Names;
use tollgate_schemas::bus::{EventBus, JetStreamBus, StreamSettings};
use tollgate_schemas::events::EventKind;

use crate::auth::KeyStore;
use crate::config::Config;
use crate::error::{ApiStyle, GatewayError};
use crate::limits::Limits;
use crate::prices::PriceFeed;
use crate::publisher::{AckHook, Publisher, PublisherConfig, PublisherHandle};
use crate::quota::Quotas;
use crate::routing::Router as ModelRouter;
use crate::state::{App, AppState, RequestId};
use crate::state_cache::{self, StateCache};
use crate::{anthropic, openai, telemetry};

/// How long start-up waits for NATS before it serves from its spool and its
/// on-disk state cache instead (each bucket and the streams, concurrently).
const NATS_AT_START: Duration = Duration::from_secs(2);

/// What [`build`] hands to [`run`] besides the state: the tasks to run.
pub struct Started {
    pub app: App,
    pub publisher: PublisherHandle,
    pub prices: PriceFeed,
    /// The events streams could not be checked at start (NATS down): to be
    /// ensured once NATS answers.
    pub streams_pending: Option<(JetStreamBus, StreamSettings)>,
}

/// Connects to NATS (in the background if it is down), opens the key store,
/// loads the quota states and the price book (from the on-disk state cache
/// when NATS does not answer within [`NATS_AT_START`]), starts the publisher
/// (telling the quotas what the bus acknowledged).
pub async fn build(config: Config) -> anyhow::Result<Started> {
    // The recorder first: what is recorded before it exists is lost.
    let prometheus = telemetry::prometheus();
    let names = Names::namespaced(&config.nats.namespace);
    let settings = StreamSettings {
        max_age: Duration::from_secs(config.nats.stream_max_age_days * 86_400),
        duplicate_window: Duration::from_secs(config.nats.duplicate_window_secs),
        ..Default::default()
    };
    let jsbus = JetStreamBus::connect_lazy(&config.nats.url, names.clone()).await?;
    let cache = StateCache::new(&config.data_dir);
    let js = jsbus.jetstream();
    let (streams, keys, quotas, prices) = tokio::join!(
        tokio::time::timeout(NATS_AT_START, jsbus.ensure_streams(settings)),
        KeyStore::open(js, &names.kv_keys, NATS_AT_START),
        Quotas::open(js, &names.kv_quota, NATS_AT_START, cache.quota()),
        PriceFeed::open(
            js,
            &names.kv_prices,
            config.prices.book(),
            NATS_AT_START,
            cache.prices()
        ),
    );
    let streams_pending = match streams {
        Ok(Ok(())) => None,
        Ok(Err(e)) if !e.is_retryable() => return Err(e.into()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "NATS unreachable at start; spooling events until it answers");
            Some((jsbus.clone(), settings))
        }
        Err(_) => {
            tracing::warn!("NATS did not answer at start; spooling events until it does");
            Some((jsbus.clone(), settings))
        }
    };
    for record in cache.keys() {
        keys.restore(record).await;
    }
    let book = prices.in_force(chrono::Utc::now());
    metrics::gauge!("tollgate_gateway_price_book_version").set(book.version as f64);
    // Events go to the configured bus; KV above stays on JetStream.
    let bus: Arc<dyn EventBus> =
        tollgate_schemas::bus::events_bus(config.bus, &jsbus, &config.kafka).await?;
    let on_ack: AckHook = {
        let (names, quotas) = (names.clone(), quotas.clone());
        Arc::new(move |msg, position| {
            if names.kind_of_subject(&msg.subject) == Some(EventKind::Usage) {
                quotas.acknowledged(&msg.id, position);
            }
        })
    };
    let (publisher, handle) = Publisher::start_with_ack(
        bus.clone(),
        PublisherConfig {
            spool_dir: config.data_dir.join("spool"),
            spool_max_bytes: config.spool.max_bytes,
            sync_interval: Duration::from_millis(config.spool.fsync_interval_ms),
            ..PublisherConfig::default()
        },
        Some(on_ack),
    )
    .await?;
    // Usage a previous run produced and the bus never acknowledged is spend
    // billing has not seen: the local debit must hold it again.
    if publisher.spool_depth() > 0 {
        let (names, quotas) = (names.clone(), quotas.clone());
        publisher
            .for_each_unacknowledged(move |msg| {
                if names.kind_of_subject(&msg.subject) != Some(EventKind::Usage) {
                    return;
                }
                if let Ok(tollgate_schemas::Event::Usage(u)) =
                    tollgate_schemas::Event::from_json(&msg.payload)
                {
                    quotas.debit_ids(&u.meta.tenant_id, &u.meta.key_id, &msg.id, u.cost);
                }
            })
            .await?;
    }
    // Rendered from the start, not only once something was spooled.
    metrics::gauge!("tollgate_gateway_spool_events").set(publisher.spool_depth() as f64);
    metrics::gauge!("tollgate_gateway_spool_bytes").set(publisher.spool_bytes() as f64);
    let state = AppState {
        router: ModelRouter::new(&config)?,
        limits: Limits::new(&config.limits),
        quotas,
        prices: Arc::new(RwLock::new(book)),
        names,
        keys,
        bus,
        publisher,
        metrics: prometheus,
        config,
    };
    Ok(Started {
        app: Arc::new(state),
        publisher: handle,
        prices,
        streams_pending,
    })
}

/// Creates (or checks) the events streams once NATS answers, so a gateway
/// that started without NATS publishes into streams that exist.
async fn ensure_streams_when_up(
    bus: JetStreamBus,
    settings: StreamSettings,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match bus.ensure_streams(settings).await {
            Ok(()) => {
                tracing::info!("NATS answered: events streams ready");
                return;
            }
            Err(e) if !e.is_retryable() => {
                tracing::error!(error = %e, "the events streams cannot be created; events stay in the spool");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "NATS still unreachable"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

pub fn routes(app: App) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(openai::responses))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model}", get(openai::get_model))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        // Outermost last: every answer of the edge carries the request id.
        .layer(middleware::from_fn_with_state(
            app.clone(),
            crate::edge::guard,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(app)
}

/// Serves until `shutdown`, then drains in order (see the module doc).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Started {
        app,
        publisher: publisher_handle,
        prices,
        streams_pending,
    } = build(config).await?;
    let cancel = CancellationToken::new();
    let cache = StateCache::new(&app.config.data_dir);
    let mut watches = vec![
        tokio::spawn(app.keys.clone().watch(cancel.clone())),
        tokio::spawn(app.quotas.clone().watch(cancel.clone())),
        tokio::spawn(state_cache::run(
            cache,
            app.keys.clone(),
            app.quotas.clone(),
            prices.versions(),
            cancel.clone(),
        )),
        tokio::spawn(prices.run(app.prices.clone(), cancel.clone())),
    ];
    if let Some((bus, settings)) = streams_pending {
        watches.push(tokio::spawn(ensure_streams_when_up(
            bus,
            settings,
            cancel.clone(),
        )));
    }
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let server_config = app.config.server.clone();
    crate::server::serve(listener, routes(app.clone()), &server_config, shutdown).await;
    tracing::info!("gateway draining: flushing events");
    publisher_handle.shutdown(Duration::from_secs(30)).await;
    cancel.cancel();
    for watch in watches {
        let _ = watch.await;
    }
    Ok(())
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id: Arc<str> = format!("req_{}", uuid::Uuid::now_v7().simple()).into();
    req.extensions_mut().insert(RequestId(id.clone()));
    let anthropic = ApiStyle::for_path(req.uri().path()) == ApiStyle::Anthropic;
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        if anthropic {
            resp.headers_mut().insert("request-id", v.clone());
        }
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// 503 only when the gateway cannot accept work: the spool is full (or the
/// disk refuses it), or no key could authenticate (the keys bucket is not
/// open and nothing is cached). Everything else it knows is in the body: the
/// bus down and events spooling, events parked as rejected, the buckets.
async fn readyz(State(app): State<App>) -> Response {
    let bus = tokio::time::timeout(Duration::from_secs(1), app.bus.ready())
        .await
        .is_ok_and(|r| r.is_ok());
    let publisher = &app.publisher;
    let keys_open = app.keys.bucket_open();
    let cached_keys = app.keys.cached_count();
    let body = serde_json::json!({
        "bus": if bus { "ok" } else { "unreachable" },
        "spooling": !bus,
        "spool_events": publisher.spool_depth(),
        "spool_bytes": publisher.spool_bytes(),
        "spool_full": publisher.spool_full(),
        "rejected_events": publisher.rejected_events(),
        "keys": if keys_open { "ok" } else { "unreachable" },
        "cached_keys": cached_keys,
        "models": app.router.names.len(),
    });
    let serving = !publisher.spool_full() && (keys_open || app.keys.has_cached());
    let status = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    let style = ApiStyle::for_path(req.uri().path());
    GatewayError::MethodNotAllowed(req.method().to_string()).into_response_for(style)
}

async fn fallback(req: Request) -> Response {
    let style = ApiStyle::for_path(req.uri().path());
    GatewayError::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
        .into_response_for(style)
}
