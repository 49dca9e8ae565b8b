//! The `docker` part of cyb-bench: cybd's Docker backend against the `docker run --rm` CLI
//! on the same engine. Start latency (submit -> the job's first stdout line) over
//! sequential `echo ready` jobs, and the throughput of many `true` containers: cybd with
//! its slots, the CLI one at a time and `--slots` at a time. Never pulls (the image must be
//! local); every container the CLI side starts carries [`LABEL`] and is removed at the end,
//! on error, and on a signal.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, ensure};
use cyb_proto::CybClient;
use cyb_proto::rpc::SubmitRequest;
use serde_json::{Value, json};

use super::{
    Cybd, Opts, Throughput, Undo, Window, connect, ctx, load_text, median, ms, on_signal, pct, progress,
    wait_all_done, wait_quiet,
};

/// The image both sides run (a local test image: tests/system/docker.sh imports it).
pub const IMAGE: &str = "cyb-test:busybox";
/// Label on every container the CLI side starts, to find and remove them.
const LABEL: &str = "cyb-bench=docker";

/// What the part measured.
pub struct Figures {
    pub server_version: String,
    /// Submit (RPC) -> first line in stdout.log, ms, one job at a time.
    pub cybd_latency: Vec<f64>,
    /// `docker run --rm` spawned -> first stdout line read, ms.
    pub cli_latency: Vec<f64>,
    pub cybd: Throughput,
    pub cli_seq: Throughput,
    pub cli_par: Throughput,
}

/// The docker CLI (Debian's, which matches the engine, when present).
fn docker_cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        super::find_program("docker").unwrap_or_else(|| PathBuf::from("docker"))
    }
}

fn docker() -> Command {
    let mut c = Command::new(docker_cli());
    c.stdin(Stdio::null());
    c
}

/// The engine's version if it answers and has [`IMAGE`]; Err says why the part is skipped.
pub fn engine_ready() -> Result<String, String> {
    let out = docker()
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", docker_cli().display()))?;
    if !out.status.success() {
        return Err(format!(
            "no Docker engine answers (`docker version`: {}); tests/system/docker.sh up starts one",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let img = docker()
        .args(["image", "inspect", "--format", "{{.Id}}", IMAGE])
        .output()
        .map_err(|e| format!("cannot run docker image inspect: {e}"))?;
    if !img.status.success() {
        return Err(format!(
            "the engine has no image {IMAGE} (nothing is pulled; tests/system/docker.sh up imports it)"
        ));
    }
    Ok(version)
}

/// The pids of the running dockerd processes: they change when the engine restarts.
fn engine_pids() -> Option<String> {
    let out = Command::new("pgrep").args(["-x", "dockerd"]).output().ok()?;
    let pids = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!pids.is_empty()).then_some(pids)
}

/// Waits up to 3 minutes for the engine to answer again.
async fn wait_engine() -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        match engine_ready() {
            Ok(_) => return Ok(()),
            Err(why) if Instant::now() >= end => {
                return Err(anyhow!("the engine did not come back within 3 minutes: {why}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Runs measurement `f` until the engine stays up through one run (it is shared: tests of
/// the engine's trouble stop and restart it): a run the engine restarted or went away
/// during is measured again, up to 4 more times. A run that fails on a steady engine fails.
async fn undisturbed<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 0;
    loop {
        wait_engine().await?;
        let before = engine_pids();
        let r = f().await;
        let steady = before.is_some() && engine_pids() == before && engine_ready().is_ok();
        if steady || attempt == 4 {
            return r.with_context(|| format!("{what} (the engine stayed up)"));
        }
        attempt += 1;
        progress(format!(
            "   the Docker engine restarted or went away during {what}; measuring it again"
        ));
        remove_cli_containers();
    }
}

/// Removes every container the CLI side started (any state).
fn remove_cli_containers() {
    let Ok(out) = docker()
        .args(["ps", "--all", "--quiet", "--filter", &format!("label={LABEL}")])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        let _ = docker()
            .args(["rm", "--force"])
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes the CLI side's containers when dropped.
struct CliContainers;

impl Drop for CliContainers {
    fn drop(&mut self) {
        remove_cli_containers();
    }
}

fn cybd_config() -> String {
    format!("[docker]\nallowed_images = [\"{IMAGE}\"]\n")
}

fn request(cmd: &[&str]) -> SubmitRequest {
    SubmitRequest {
        spec_json: json!({ "docker": { "image": IMAGE, "command": cmd } }).to_string(),
        default_cwd: None,
    }
}

/// One cybd sample: submit `echo ready`, then the time until stdout.log holds a line; waits
/// for the job's result before returning, so samples do not overlap.
async fn cybd_sample(c: &Cybd, client: &CybClient) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let id = client
        .submit(ctx(Duration::from_secs(30)), request(&["echo", "ready"]))
        .await?
        .map_err(|e| anyhow!("submit refused: {e}"))?
        .id;
    let run = c.d.run_dir(id);
    let log = run.join("stdout.log");
    let end = t0 + Duration::from_secs(60);
    let latency = loop {
        if std::fs::read(&log).is_ok_and(|b| b.contains(&b'\n')) {
            break ms(t0.elapsed());
        }
        ensure!(
            Instant::now() < end,
            "job {id} wrote no line to {} within 60 s; log tail:\n{}",
            log.display(),
            c.log_tail()
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    let result = run.join("result.json");
    loop {
        if let Ok(t) = std::fs::read_to_string(&result)
            && let Ok(v) = serde_json::from_str::<Value>(&t)
        {
            ensure!(v["state"] == "succeeded", "job {id} did not succeed: {v}");
            return Ok(latency);
        }
        ensure!(
            Instant::now() < end,
            "job {id} has no result.json within 60 s; log tail:\n{}",
            c.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `--docker-samples` of each side, alternating, on a fresh cybd.
async fn latency_block(o: &Opts) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let c = Cybd::start_with(o, &cybd_config());
    let client = connect(&c.d.socket()).await?;
    // One unmeasured job each: the first container start warms the engine's caches.
    cybd_sample(&c, &client).await?;
    blocking(cli_sample).await?;
    let (mut cybd, mut cli) = (Vec::new(), Vec::new());
    for _ in 0..o.docker_samples.max(1) {
        cybd.push(cybd_sample(&c, &client).await?);
        cli.push(blocking(cli_sample).await?);
    }
    Ok((cybd, cli))
}

/// One CLI sample: spawn `docker run --rm IMAGE echo ready`, time to its first stdout line;
/// waits for it to exit.
fn cli_sample() -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut child = docker()
        .args(["run", "--rm", "--label", LABEL, IMAGE, "echo", "ready"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run docker run")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let latency = ms(t0.elapsed());
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && line == "ready\n",
        "docker run failed ({}): stdout {line:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(latency)
}

/// `n` x `docker run --rm IMAGE true`, `width` at a time.
fn cli_throughput(n: usize, width: usize) -> anyhow::Result<Throughput> {
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..width.max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        super::run_ok(
                            docker()
                                .args(["run", "--rm", "--label", LABEL, IMAGE, "true"])
                                .stdout(Stdio::null()),
                            "docker run --rm true",
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("a docker run thread panicked"))??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let total = t0.elapsed();
    Ok(Throughput {
        n,
        enqueue: total,
        total,
        peak_rss_mib: None,
        cpu_ms: None,
        other_load: None,
        steal: None,
        runs: Vec::new(),
    })
}

/// cybd: `n` docker `true` jobs submitted over RPC (all in flight), until every result.json.
async fn cybd_throughput(o: &Opts, n: usize) -> anyhow::Result<Throughput> {
    let c = Cybd::start_with(o, &cybd_config());
    let client = connect(&c.d.socket()).await?;
    let t0 = Instant::now();
    let results: Vec<_> = {
        use futures::StreamExt as _;
        futures::stream::iter(0..n)
            .map(|_| {
                let client = client.clone();
                async move {
                    client
                        .submit(ctx(Duration::from_secs(600)), request(&["true"]))
                        .await
                }
            })
            .buffer_unordered(o.rpc_concurrency.max(1))
            .collect()
            .await
    };
    for r in results {
        r.context("submit call failed")?
            .map_err(|e| anyhow!("submit refused: {e}"))?;
    }
    let enqueue = t0.elapsed();
    let done = wait_all_done(&c, &client, n).await?;
    Ok(Throughput::of_cybd(&c, n, enqueue, done - t0))
}

/// Runs a blocking CLI measurement off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("measurement thread failed: {e}"))?
}

/// The median of `--repeat` runs of `f` (each after waiting for a quiet machine).
async fn repeated<F, Fut>(o: &Opts, what: &str, mut f: F) -> anyhow::Result<Throughput>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Throughput>>,
{
    let mut all = Vec::new();
    for i in 0..o.repeat.max(1) {
        wait_quiet(o).await;
        let w = Window::start();
        let mut t = undisturbed(what, &mut f).await?;
        t.steal = Some(w.steal_share());
        progress(format!(
            "   {what}, run {}: {:.1} jobs/s ({:.1} s; {})",
            i + 1,
            t.jobs_per_s(),
            t.total.as_secs_f64(),
            load_text(None, t.steal)
        ));
        all.push(t);
    }
    Ok(median(all))
}

/// The whole part (the engine was found ready, at `server_version`).
pub async fn run(o: &Opts, server_version: String) -> anyhow::Result<Figures> {
    let _cleanup = CliContainers;
    let _undo = on_signal(Undo::Run(
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "{} ps -aq --filter label={LABEL} | xargs -r {} rm -f",
                docker_cli().display(),
                docker_cli().display()
            ),
        ],
        Vec::new(),
    ));
    let n = o.docker_samples.max(1) * o.repeat.max(1);
    progress(format!(
        "6a: docker start latency, {n} `echo ready` containers one at a time, cybd and `docker run --rm` alternating..."
    ));
    let (mut cybd_latency, mut cli_latency) = (Vec::new(), Vec::new());
    for _ in 0..o.repeat.max(1) {
        wait_quiet(o).await;
        let (c, d) = undisturbed("the start latency", || latency_block(o)).await?;
        cybd_latency.extend(c);
        cli_latency.extend(d);
    }
    progress(format!(
        "   p50 / p99: cybd {:.0} / {:.0} ms, docker run {:.0} / {:.0} ms",
        pct(&cybd_latency, 50.0),
        pct(&cybd_latency, 99.0),
        pct(&cli_latency, 50.0),
        pct(&cli_latency, 99.0)
    ));
    let jobs = o.docker_jobs.max(1);
    let width = o.slots;
    progress(format!(
        "6b: {jobs} `true` containers through cybd ({width} slots)..."
    ));
    let cybd = repeated(o, "cybd", || cybd_throughput(o, jobs)).await?;
    progress(format!("6c: {jobs} x `docker run --rm true`, one at a time..."));
    let cli_seq = repeated(o, "docker run, sequential", || {
        blocking(move || cli_throughput(jobs, 1))
    })
    .await?;
    progress(format!(
        "6d: {jobs} x `docker run --rm true`, {width} at a time..."
    ));
    let cli_par = repeated(o, &format!("docker run, {width} at a time"), || {
        blocking(move || cli_throughput(jobs, width))
    })
    .await?;
    Ok(Figures {
        server_version,
        cybd_latency,
        cli_latency,
        cybd,
        cli_seq,
        cli_par,
    })
}

impl Figures {
    pub fn json(&self, slots: usize) -> Value {
        let stats = |v: &[f64]| {
            json!({ "samples": v.len(), "p50_ms": pct(v, 50.0), "p99_ms": pct(v, 99.0),
                    "min_ms": pct(v, 0.0), "max_ms": pct(v, 100.0) })
        };
        let t = |t: &Throughput| {
            json!({ "jobs": t.n, "total_s": t.total.as_secs_f64(), "jobs_per_s": t.jobs_per_s(),
                    "runs_jobs_per_s": t.runs })
        };
        json!({
            "engine": self.server_version,
            "image": IMAGE,
            "start_latency": {
                "measured_by": "cybd: RPC submit call -> first line in the job's stdout.log; docker: spawning `docker run --rm IMAGE echo ready` -> its first stdout line read",
                "cybd": stats(&self.cybd_latency),
                "docker_run": stats(&self.cli_latency),
            },
            "throughput": {
                "slots": slots,
                "cybd": t(&self.cybd),
                "docker_run_sequential": t(&self.cli_seq),
                "docker_run_parallel": t(&self.cli_par),
                "ratio_cybd_to_sequential": self.cybd.jobs_per_s() / self.cli_seq.jobs_per_s(),
                "ratio_cybd_to_parallel": self.cybd.jobs_per_s() / self.cli_par.jobs_per_s(),
            },
        })
    }

    pub fn print(&self, slots: usize) {
        let (c, d) = (&self.cybd_latency, &self.cli_latency);
        let lat = |v: &[f64], p: f64| format!("{:.0}", pct(v, p));
        super::print_table(
            &format!(
                "docker: start latency, {} x `echo ready` in {IMAGE}, one at a time (engine {})",
                c.len(),
                self.server_version
            ),
            &["side", "p50 ms", "p99 ms", "min ms", "max ms"],
            &[
                vec![
                    "cybd (RPC submit -> first line in stdout.log)".into(),
                    lat(c, 50.0),
                    lat(c, 99.0),
                    lat(c, 0.0),
                    lat(c, 100.0),
                ],
                vec![
                    "docker run --rm (spawn -> first stdout line)".into(),
                    lat(d, 50.0),
                    lat(d, 99.0),
                    lat(d, 0.0),
                    lat(d, 100.0),
                ],
                vec![
                    "cybd / docker run".into(),
                    format!("{:.2}x", pct(c, 50.0) / pct(d, 50.0)),
                    format!("{:.2}x", pct(c, 99.0) / pct(d, 99.0)),
                    String::new(),
                    String::new(),
                ],
            ],
        );
        let row = |name: String, t: &Throughput| {
            vec![
                name,
                format!("{:.2}", t.total.as_secs_f64()),
                format!("{:.1}", t.jobs_per_s()),
                format!("{:.2}x", self.cybd.jobs_per_s() / t.jobs_per_s()),
                t.runs
                    .iter()
                    .map(|r| format!("{r:.1}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        };
        super::print_table(
            &format!(
                "docker: throughput, {} x `true` containers, submit-all -> all ended",
                self.cybd.n
            ),
            &["side", "wall s", "jobs/s", "cybd / side", "runs jobs/s"],
            &[
                row(format!("cybd ({slots} slots, RPC)"), &self.cybd),
                row("docker run --rm, one at a time".into(), &self.cli_seq),
                row(format!("docker run --rm, {slots} at a time"), &self.cli_par),
            ],
        );
        println!(
            "docker: cybd's throughput ends at the last result.json (the container removed and its end \
             durable); docker run's at the last CLI exit. Containers started by the CLI carry label {LABEL} \
             and are removed at the end."
        );
    }
}
