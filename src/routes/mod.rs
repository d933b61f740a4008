//! Model routes: a name clients call exactly as they call a model, whose requests are split
//! over its targets by weight (a canary at 10 %, an A/B test at 50/50). A sticky key (a request
//! parameter the route names) keeps one caller on one target by a hash, the same on every front
//! end; without it each request draws its target. The route is resolved where a request is
//! looked up (`InferService`), so gRPC, HTTP and tasks all see it, and Triton's answer names the
//! model and version that served it, as it always does.
//!
//! The routes come from their own file (`--routes-file`), read at start and again on SIGHUP; a
//! file that does not load is refused with the setting named, and the running routes stay.

pub mod file;
pub mod route;

use std::{
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

pub use file::RouteError;
pub use route::{Route, RouteTable, Target};

/// The running routes, swapped whole on reload: a request holds the table it started with.
#[derive(Default)]
pub struct Routes {
    table: RwLock<Arc<RouteTable>>,
    /// Skips the lookup on the hot path while no route is configured.
    any: AtomicBool,
    file: Option<PathBuf>,
}

impl Routes {
    /// The routes of `file` (none without one); a file that does not load stops the start.
    pub fn load(file: Option<PathBuf>) -> Result<Self, RouteError> {
        let routes = Self {
            file,
            ..Self::default()
        };
        routes.reload()?;
        Ok(routes)
    }

    /// Reads the file again; on an error the running routes stay as they were.
    pub fn reload(&self) -> Result<usize, RouteError> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let table = file::read(path)?;
        let n = table.routes.len();
        self.set(table);
        Ok(n)
    }

    pub fn set(&self, table: RouteTable) {
        self.any.store(!table.routes.is_empty(), Ordering::Release);
        *self.table.write().expect("routes lock") = Arc::new(table);
    }

    pub fn get(&self, name: &str) -> Option<Arc<Route>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.table
            .read()
            .expect("routes lock")
            .routes
            .get(name)
            .cloned()
    }

    pub fn file(&self) -> Option<&PathBuf> {
        self.file.as_ref()
    }
}
