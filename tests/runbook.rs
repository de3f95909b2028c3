//! The runbook's commands, run as written against a live Switchyard: the `sh` blocks of
//! docs/runbook.md, in order, with `switchyard` on PATH and the documented addresses
//! pointed at this test's listeners. If the runbook drifts from the CLI, this fails.

mod support;

use support::*;

fn sh_blocks(markdown: &str) -> String {
    let mut script = String::new();
    let mut inside = false;
    for line in markdown.lines() {
        match (inside, line.trim_start()) {
            (false, l) if l.starts_with("```sh") => inside = true,
            (true, l) if l.starts_with("```") => inside = false,
            (true, _) => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[tokio::test]
async fn the_runbook_commands_work_as_written() {
    let env = EnvBuilder::default().start().await;
    let markdown = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/runbook.md"))
        .expect("runbook");
    let script = sh_blocks(&markdown);
    assert!(
        script.matches("switchyard ctl").count() >= 8,
        "the runbook shows the ctl sequence:\n{script}"
    );
    let script = script
        .replace(
            "http://127.0.0.1:9901",
            &format!("http://{}", env.app().admin_addr),
        )
        .replace(
            "http://127.0.0.1:8081",
            &format!("http://{}", env.app().preview_addr.expect("preview")),
        );

    // A working directory laid out as the runbook assumes: config/admin.token, and the
    // binary on PATH as `switchyard`.
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(work.path().join("config")).expect("config dir");
    std::fs::write(work.path().join("config/admin.token"), TOKEN).expect("token");
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_switchyard"), bin.join("switchyard"))
        .expect("symlink");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let output = tokio::time::timeout(
        PATIENCE * 3,
        tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(work.path())
            .env("PATH", path)
            .env_remove("SWITCHYARD_ADMIN_TOKEN")
            .output(),
    )
    .await
    .expect("the runbook finishes")
    .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "runbook failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    // The story ends where the runbook says: green active and committed, blue drained.
    let (_, status) = env.admin_get("/status").await;
    assert_eq!(status["active"], "green");
    assert_eq!(status["rollback_to"], serde_json::Value::Null);
    let (_, history) = env.admin_get("/history").await;
    let actions: Vec<&str> = history["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["startup", "flip", "rollback", "flip", "commit"]);
    assert!(stdout.contains("blue is drained"), "{stdout}");
}
