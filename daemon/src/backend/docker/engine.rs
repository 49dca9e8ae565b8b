//! The Docker engine as cybd sees it: a client on the Engine API's unix socket (the API
//! version negotiated with the engine), and what a background check last found (reachable,
//! versions, cgroup driver, runtimes), which intake, the scheduler and `cybctl health`
//! read without waiting on the engine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use cyb_proto::rpc::DockerHealth;

/// What the engine said about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineInfo {
    pub server_version: String,
    /// The API version both sides speak (negotiated).
    pub api_version: String,
    /// `cgroupfs` or `systemd`.
    pub cgroup_driver: String,
    /// `1` or `2`.
    pub cgroup_version: String,
    /// Runtimes the engine has (`runc`, `nvidia`...).
    pub runtimes: Vec<String>,
    /// CPUs the engine sees (a container cannot be given more).
    pub ncpu: Option<i64>,
    /// The images the engine had at the check, for intake's early answers (a job's start
    /// checks the engine itself again).
    pub images: Vec<LocalImage>,
}

/// An image on the engine: its id and its names, normalized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalImage {
    pub id: String,
    pub names: Vec<String>,
}

impl EngineInfo {
    /// The image `requested` names, among those of the last check.
    pub fn find(&self, requested: &super::image::Requested) -> Option<&LocalImage> {
        match requested {
            super::image::Requested::Id(id) => self.images.iter().find(|i| i.id == *id),
            super::image::Requested::Named(r) => {
                let want = r.canonical();
                self.images.iter().find(|i| i.names.contains(&want))
            }
        }
    }
}

/// The engine, and what the last check found.
pub struct Engine {
    socket: PathBuf,
    timeout: Duration,
    /// `Ok` once a check reached the engine; `Err(why)` otherwise (not checked yet too).
    last: Mutex<Result<EngineInfo, String>>,
    /// A client with the negotiated version, kept while the engine answers.
    client: Mutex<Option<Docker>>,
}

impl Engine {
    pub fn new(socket: &Path, timeout: Duration) -> Arc<Engine> {
        Arc::new(Engine {
            socket: socket.to_path_buf(),
            timeout,
            last: Mutex::new(Err("the docker engine has not been checked yet".into())),
            client: Mutex::new(None),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the last check found.
    pub fn status(&self) -> Result<EngineInfo, String> {
        self.last
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn set(&self, v: Result<EngineInfo, String>) {
        match self.last.lock() {
            Ok(mut g) => *g = v,
            Err(e) => *e.into_inner() = v,
        }
    }

    fn cached(&self) -> Option<Docker> {
        self.client.lock().ok().and_then(|g| g.clone())
    }

    fn forget(&self) {
        if let Ok(mut g) = self.client.lock() {
            *g = None;
        }
    }

    /// A client, with the API version negotiated (once, while the engine answers).
    pub async fn client(&self) -> Result<Docker, String> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let c = connect(&self.socket, self.timeout).await?;
        if let Ok(mut g) = self.client.lock() {
            *g = Some(c.clone());
        }
        Ok(c)
    }

    /// Asks the engine about itself and keeps the answer for [`Engine::status`].
    pub async fn check(&self) -> Result<EngineInfo, String> {
        let res = async {
            let c = self.client().await?;
            let what = |e: bollard::errors::Error| engine_error(&self.socket, &e);
            let version = c.version().await.map_err(what)?;
            let info = c.info().await.map_err(what)?;
            let list = c
                .list_images(None::<bollard::query_parameters::ListImagesOptions>)
                .await
                .map_err(what)?;
            let images = list
                .into_iter()
                .map(|i| LocalImage {
                    names: i
                        .repo_tags
                        .iter()
                        .chain(i.repo_digests.iter())
                        .filter_map(|n| super::image::parse(n).ok().map(|r| r.canonical()))
                        .collect(),
                    id: i.id,
                })
                .collect();
            let v = c.client_version();
            Ok(EngineInfo {
                server_version: version.version.unwrap_or_default(),
                api_version: format!("{}.{}", v.major_version, v.minor_version),
                cgroup_driver: info.cgroup_driver.map(|d| d.to_string()).unwrap_or_default(),
                cgroup_version: info.cgroup_version.map(|d| d.to_string()).unwrap_or_default(),
                runtimes: info.runtimes.map(|r| r.into_keys().collect()).unwrap_or_default(),
                ncpu: info.ncpu,
                images,
            })
        }
        .await;
        if res.is_err() {
            self.forget();
        }
        self.set(res.clone());
        res
    }

    /// Checks the engine every `interval`, for as long as the daemon runs; `changed` is
    /// called when it comes or goes (the scheduler starts waiting jobs then).
    pub fn spawn_monitor(self: &Arc<Self>, interval: Duration, changed: impl Fn(bool) + Send + 'static) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut was: Option<bool> = None;
            loop {
                let now = this.check().await;
                let up = now.is_ok();
                if was != Some(up) {
                    match &now {
                        Ok(i) => tracing::info!(
                            "docker engine {} reachable on {} (API {}, cgroup driver {})",
                            i.server_version,
                            this.socket.display(),
                            i.api_version,
                            i.cgroup_driver
                        ),
                        Err(why) if was.is_some() => {
                            tracing::warn!("{why}; docker jobs wait until it is back")
                        }
                        Err(why) => tracing::info!("{why}; docker jobs wait until it is there"),
                    }
                    changed(up);
                    was = Some(up);
                }
                tokio::time::sleep(interval).await;
            }
        });
    }

    /// For `cybctl health`.
    pub fn health(&self, configured: Result<(), String>, gpu_runtime: &str) -> DockerHealth {
        let status = self.status();
        let mut h = DockerHealth {
            socket: self.socket.display().to_string(),
            configured: configured.is_ok(),
            ..Default::default()
        };
        if let Err(why) = configured {
            h.problem = Some(why);
        }
        match status {
            Ok(i) => {
                h.reachable = true;
                h.gpus = i.runtimes.iter().any(|r| r == gpu_runtime);
                if !h.gpus {
                    h.gpu_problem = Some(no_gpu_runtime(gpu_runtime, &i.runtimes));
                }
                h.server_version = i.server_version;
                h.api_version = i.api_version;
                h.cgroup_driver = i.cgroup_driver;
                h.cgroup_version = i.cgroup_version;
                h.runtimes = i.runtimes;
            }
            Err(why) => {
                if h.problem.is_none() {
                    h.problem = Some(why);
                }
            }
        }
        h
    }
}

/// Why GPU docker jobs are refused on an engine with `runtimes`.
pub fn no_gpu_runtime(gpu_runtime: &str, runtimes: &[String]) -> String {
    format!(
        "the docker engine has no `{gpu_runtime}` runtime (it has: {}), so it cannot give containers GPUs; install the NVIDIA container toolkit, or set [docker] gpu_runtime",
        if runtimes.is_empty() {
            "none".to_string()
        } else {
            runtimes.join(", ")
        }
    )
}

/// Connects to the engine on `socket` and negotiates the API version.
pub async fn connect(socket: &Path, timeout: Duration) -> Result<Docker, String> {
    let path = socket
        .to_str()
        .ok_or_else(|| format!("{} is not a UTF-8 path", socket.display()))?;
    let c = Docker::connect_with_unix(path, timeout.as_secs().max(1), bollard::API_DEFAULT_VERSION)
        .map_err(|e| engine_error(socket, &e))?;
    c.negotiate_version().await.map_err(|e| engine_error(socket, &e))
}

/// An Engine API error in words that name the socket.
pub fn engine_error(socket: &Path, e: &bollard::errors::Error) -> String {
    use bollard::errors::Error as E;
    match e {
        E::SocketNotFoundError(_) => format!(
            "the docker engine is not reachable: no socket at {}",
            socket.display()
        ),
        E::DockerResponseServerError { status_code, message } => {
            format!("the docker engine answered {status_code}: {message}")
        }
        E::RequestTimeoutError => format!("the docker engine on {} did not answer in time", socket.display()),
        other => format!(
            "the docker engine is not reachable on {}: {other}",
            socket.display()
        ),
    }
}

/// Whether `e` is the engine saying "no such object".
pub fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }
    )
}
