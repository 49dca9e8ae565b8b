//! The Docker engine the Docker backend's tests run against (tests/system/docker.sh, via
//! cyb_tests::docker): it comes up, holds the test images, runs a container locked down
//! the way cybd runs jobs, and hands GPU device requests to the NVIDIA test double.

use cyb_tests::docker::{self, IMAGE, IMAGE_OTHER_NAME, IMAGE_ROOT_USER, NVIDIA_RUNTIME};

#[test]
fn test_images_are_there() {
    let _use = docker::shared();
    let Some(e) = docker::engine() else { return };
    for image in [IMAGE, IMAGE_ROOT_USER, IMAGE_OTHER_NAME] {
        let found = e.inspect(image);
        assert!(found.is_object(), "no image {image} on the engine");
    }
    assert_eq!(
        e.inspect(IMAGE)["Id"],
        e.inspect(IMAGE_OTHER_NAME)["Id"],
        "{IMAGE_OTHER_NAME} is not the same image as {IMAGE}"
    );
    assert_eq!(e.inspect(IMAGE)["Config"]["User"], "");
    assert_eq!(e.inspect(IMAGE_ROOT_USER)["Config"]["User"], "root");
}

#[test]
fn locked_down_container_runs_as_the_given_user() {
    let _use = docker::shared();
    let Some(e) = docker::engine() else { return };
    let out = e.cli_ok([
        "run",
        "--rm",
        "--init",
        "--user",
        "1234:1234",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "none",
        IMAGE_ROOT_USER,
        "id",
        "-u",
    ]);
    assert_eq!(out.trim(), "1234");
}

#[test]
fn containers_are_found_by_label() {
    let _use = docker::shared();
    let Some(e) = docker::engine() else { return };
    let label = format!("cyb-test.docker-env={}", std::process::id());
    let id = e
        .cli_ok(["create", "--label", &label, IMAGE, "true"])
        .trim()
        .to_string();
    assert_eq!(e.containers_labeled(&label), vec![id.clone()]);
    assert_eq!(
        e.inspect(&id)["Config"]["Labels"]["cyb-test.docker-env"],
        std::process::id().to_string()
    );
    e.cli_ok(["rm", &id]);
    assert!(e.containers_labeled(&label).is_empty());
    assert!(e.inspect(&id).is_null());
}

#[test]
fn engine_lists_the_nvidia_runtime() {
    let _use = docker::shared();
    let Some(e) = docker::engine() else { return };
    let info: serde_json::Value =
        serde_json::from_str(&e.cli_ok(["info", "--format", "{{json .}}"])).unwrap();
    assert!(
        info["Runtimes"].get(NVIDIA_RUNTIME).is_some(),
        "docker info lists no {NVIDIA_RUNTIME} runtime: {}",
        info["Runtimes"]
    );
}

#[test]
fn gpu_device_request_reaches_the_nvidia_double() {
    let _use = docker::shared();
    let Some(e) = docker::engine() else { return };
    let uuid = format!("GPU-fake-{}", std::process::id());
    let out = e.cli_ok([
        "run",
        "--rm",
        "--gpus",
        &format!("device={uuid}"),
        IMAGE,
        "sh",
        "-c",
        "echo $NVIDIA_VISIBLE_DEVICES",
    ]);
    assert_eq!(out.trim(), uuid);
    let log = e.nvidia_hook_log();
    assert!(
        log.lines()
            .any(|l| l.ends_with(&format!("NVIDIA_VISIBLE_DEVICES={uuid}"))),
        "the NVIDIA hook double did not run for {uuid}:\n{log}"
    );
}

#[test]
fn engine_stops_and_comes_back() {
    let _only = docker::exclusive();
    let Some(e) = docker::engine() else { return };
    let status = || {
        std::process::Command::new("bash")
            .arg(docker::script_path())
            .arg("status")
            .output()
            .unwrap()
    };
    assert_eq!(status().status.code(), Some(0));
    e.stop_engine();
    assert!(!e.answers(), "the engine still answers after docker.sh down");
    assert_eq!(status().status.code(), Some(3));
    e.start_engine();
    assert!(e.answers(), "the engine does not answer after docker.sh up");
    let out = status();
    assert_eq!(out.status.code(), Some(0), "{}", cyb_tests::shown(&out));
    assert!(cyb_tests::text(&out.stdout).contains("api 1."));
}
