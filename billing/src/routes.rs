//! A router that lists its own routes.
//!
//! axum's `Router` cannot be asked which (method, path) pairs it serves, so
//! every route of the service is registered through [`Routes`]: each call
//! hands the handler to axum *and* records the (method, path) it was given.
//! The list the OpenAPI test compares with `billing/openapi.json` is thus
//! read off the very router that serves the requests, not kept by hand.

use axum::Router;
use axum::handler::Handler;
use axum::routing::{self, MethodRouter};

/// A `Router<S>` plus the (method, path) of every route added to it.
pub struct Routes<S = ()> {
    router: Router<S>,
    listed: Vec<(&'static str, &'static str)>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Self {
            router: Router::new(),
            listed: Vec::new(),
        }
    }
}

macro_rules! method {
    ($($name:ident),*) => {$(
        #[doc = concat!("Serves `", stringify!($name), " path` with `handler`.")]
        pub fn $name<H, T>(self, path: &'static str, handler: H) -> Self
        where
            H: Handler<T, S>,
            T: 'static,
        {
            self.add(stringify!($name), path, routing::$name(handler))
        }
    )*};
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Self {
        Self::default()
    }

    method!(get, post, put, patch, delete);

    /// axum merges the methods of one path, and panics if a (method, path)
    /// is registered twice, so the list never holds a duplicate.
    fn add(mut self, method: &'static str, path: &'static str, mr: MethodRouter<S>) -> Self {
        self.router = self.router.route(path, mr);
        self.listed.push((method, path));
        self
    }

    /// Provides the state, keeping the list.
    pub fn with_state<S2: Clone + Send + Sync + 'static>(self, state: S) -> Routes<S2> {
        Routes {
            router: self.router.with_state(state),
            listed: self.listed,
        }
    }

    pub fn merge(mut self, other: Routes<S>) -> Self {
        self.router = self.router.merge(other.router);
        self.listed.extend(other.listed);
        self
    }

    /// Maps the router (layers, fallbacks) without adding routes.
    pub fn map(mut self, f: impl FnOnce(Router<S>) -> Router<S>) -> Self {
        self.router = f(self.router);
        self
    }

    /// The (method, path) of every route, lower-case methods, in
    /// registration order.
    pub fn listed(&self) -> &[(&'static str, &'static str)] {
        &self.listed
    }

    pub fn into_router(self) -> Router<S> {
        self.router
    }
}
