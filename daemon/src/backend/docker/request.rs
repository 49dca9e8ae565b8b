//! The container cybd asks the engine for (pure): who runs it, what it may do, its
//! limits, mounts, network and GPUs. Everything a job's owner could use to gain more than
//! a native job has is fixed here: never privileged, every capability dropped,
//! `no-new-privileges`, an init process as PID 1, network `none` unless allowed, the
//! owner's uid:gid and groups whatever `USER` the image declares, and no log copy kept by
//! the engine (the run directory's logs are the one copy, capped).

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig};

/// The path in the container where the run directory's `artifacts/` is mounted.
pub use super::mounts::ARTIFACTS_MOUNT;

/// Labels every container of cybd carries.
pub const LABEL_JOB: &str = "cyb.job_id";
pub const LABEL_ATTEMPT: &str = "cyb.attempt";
/// Which cybd made it (several may share an engine).
pub const LABEL_INSTANCE: &str = "cyb.instance";

/// Everything the container is made from.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub job_id: u64,
    pub attempt: u32,
    pub instance: String,
    /// The image by its id (what was checked against the allowlist).
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// `host:container:ro|rw`, already resolved and checked.
    pub binds: Vec<String>,
    /// `none` unless the job named an allowed network.
    pub network: String,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// The cgroup the container's own is made under (the job's cgroup), with the
    /// `cgroupfs` driver.
    pub cgroup_parent: Option<String>,
    /// The GPUs given to the job, by UUID where known (else by index).
    pub gpus: Vec<String>,
}

impl Request {
    pub fn body(&self) -> ContainerCreateBody {
        let labels = HashMap::from([
            (LABEL_JOB.to_string(), self.job_id.to_string()),
            (LABEL_ATTEMPT.to_string(), self.attempt.to_string()),
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
        ]);
        let device_requests = (!self.gpus.is_empty()).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: None,
                device_ids: Some(self.gpus.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                options: None,
            }]
        });
        let memory = self.memory.map(|m| i64::try_from(m).unwrap_or(i64::MAX));
        let host = HostConfig {
            binds: Some(self.binds.clone()),
            network_mode: Some(self.network.clone()),
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            init: Some(true),
            group_add: Some(self.groups.iter().map(u32::to_string).collect()),
            memory,
            // RAM and swap together, as `resources.memory` means for a native job.
            memory_swap: memory,
            nano_cpus: self.cpus.map(|c| (c * 1e9).round() as i64),
            pids_limit: self.pids.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
            cgroup_parent: self.cgroup_parent.clone(),
            device_requests,
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            auto_remove: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: self.command.clone(),
            entrypoint: self.entrypoint.clone(),
            working_dir: self.workdir.clone(),
            env: Some(self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            user: Some(format!("{}:{}", self.uid, self.gid)),
            labels: Some(labels),
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(false),
            tty: Some(false),
            host_config: Some(host),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu_job() -> Request {
        Request {
            job_id: 7,
            attempt: 2,
            instance: "i1".into(),
            image: "sha256:abc".into(),
            command: Some(vec!["nvidia-smi".into()]),
            env: vec![("NVIDIA_VISIBLE_DEVICES".into(), "GPU-aaa,GPU-bbb".into())],
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 44],
            network: "none".into(),
            memory: Some(1 << 30),
            cpus: Some(1.5),
            pids: Some(256),
            gpus: vec!["GPU-aaa".into(), "GPU-bbb".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_gpu_job_asks_for_exactly_its_gpus_by_uuid() {
        let body = serde_json::to_value(gpu_job().body()).unwrap();
        let hc = &body["HostConfig"];
        assert_eq!(
            hc["DeviceRequests"],
            serde_json::json!([{
                "Driver": "nvidia",
                "DeviceIDs": ["GPU-aaa", "GPU-bbb"],
                "Capabilities": [["gpu"]]
            }])
        );
        assert!(
            body["Env"]
                .as_array()
                .unwrap()
                .contains(&"NVIDIA_VISIBLE_DEVICES=GPU-aaa,GPU-bbb".into())
        );
    }

    #[test]
    fn the_container_is_confined_whatever_the_job_asks() {
        let body = serde_json::to_value(gpu_job().body()).unwrap();
        let hc = &body["HostConfig"];
        assert_eq!(body["User"], "1000:1000");
        assert_eq!(hc["GroupAdd"], serde_json::json!(["1000", "44"]));
        assert_eq!(hc["Privileged"], false);
        assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
        assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
        assert_eq!(hc["Init"], true);
        assert_eq!(hc["NetworkMode"], "none");
        assert_eq!(hc["Memory"], 1 << 30);
        assert_eq!(hc["MemorySwap"], 1 << 30);
        assert_eq!(hc["NanoCpus"], 1_500_000_000i64);
        assert_eq!(hc["PidsLimit"], 256);
        assert_eq!(hc["LogConfig"]["Type"], "none");
        assert_eq!(body["Labels"]["cyb.job_id"], "7");
        assert_eq!(body["Tty"], false);
    }

    #[test]
    fn a_job_without_gpus_sends_no_device_request() {
        let mut r = gpu_job();
        r.gpus.clear();
        let body = serde_json::to_value(r.body()).unwrap();
        assert!(
            body["HostConfig"]
                .get("DeviceRequests")
                .is_none_or(|v| v.is_null())
        );
    }
}
