//! The OpenAPI document makes working clients: `openapi-python-client` and
//! `@hey-api/openapi-ts` generate every operation without a warning, and
//! every stream event has a schema of its own.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::{Auth, TestApp};

/// `some_name` → `someName`.
fn camel(s: &str) -> String {
    let mut out = String::new();
    for (i, word) in s.split('_').enumerate() {
        if i == 0 {
            out.push_str(word);
        } else {
            out.push_str(&(word[..1].to_uppercase() + &word[1..]));
        }
    }
    out
}

fn generator() -> &'static str {
    let has = Command::new("openapi-python-client")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        let ok = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "openapi-python-client==0.29.1",
            ])
            .status()
            .expect("python3 is needed to check the OpenAPI document");
        assert!(ok.success(), "pip install openapi-python-client failed");
    }
    "openapi-python-client"
}

fn files_named(dir: &Path, name: &str, found: &mut usize) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_named(&path, name, found);
        } else if path.file_name().is_some_and(|n| n == name)
            && path.components().any(|c| c.as_os_str() == "api")
        {
            *found += 1;
        }
    }
}

#[tokio::test]
async fn generated_clients_cover_every_operation_and_every_event() {
    let app = TestApp::start().await;
    let (_, doc) = app.get("/api/v1/openapi.json", &Auth::None).await;
    let operations: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p.as_object().unwrap().values())
        .map(|op| op["operationId"].as_str().unwrap().to_owned())
        .collect();
    assert!(operations.len() >= 30, "{operations:?}");

    // Every event of the stream is its own schema, picked by `event`.
    let schemas = &doc["components"]["schemas"];
    let mapping = schemas["Event"]["discriminator"]["mapping"]
        .as_object()
        .unwrap();
    for name in [
        "user_message",
        "started",
        "tool_call",
        "tool_result",
        "requires_choice",
        "choice_resolved",
        "done",
        "error",
    ] {
        let at = mapping[name].as_str().unwrap();
        let schema = &schemas[at.rsplit('/').next().unwrap()];
        assert_eq!(schema["properties"]["event"]["enum"][0], name);
    }
    assert!(
        schemas["ToolResultData"]["properties"]
            .get("output")
            .is_some()
    );
    let stream = &doc["paths"]["/api/v1/loops/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        ["schema"];
    assert_eq!(stream["$ref"], "#/components/schemas/Event");

    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("openapi.json");
    std::fs::write(&spec, serde_json::to_vec(&doc).unwrap()).unwrap();

    // Python.
    let out = Command::new(generator())
        .args(["generate", "--overwrite", "--path"])
        .arg(&spec)
        .arg("--output-path")
        .arg(tmp.path().join("py"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    for bad in ["Warning", "Unable", "will not be generated", "Error"] {
        assert!(!said.contains(bad), "openapi-python-client: {said}");
    }
    for op in &operations {
        let mut found = 0;
        files_named(&tmp.path().join("py"), &format!("{op}.py"), &mut found);
        assert_eq!(found, 1, "the Python client has no `{op}`");
    }

    // TypeScript.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("node_modules/.bin/openapi-ts"))
        .arg("-i")
        .arg(&spec)
        .arg("-o")
        .arg(tmp.path().join("ts"))
        .output()
        .expect("npm ci installs @hey-api/openapi-ts");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    let sdk = std::fs::read_to_string(tmp.path().join("ts/sdk.gen.ts")).unwrap();
    for op in &operations {
        assert!(
            sdk.contains(&format!("export const {} =", camel(op))),
            "the TypeScript client has no `{op}`"
        );
    }
    let types = std::fs::read_to_string(tmp.path().join("ts/types.gen.ts")).unwrap();
    assert!(
        types.contains("ToolResultData"),
        "no event types in the TypeScript client"
    );
    let _: Value = serde_json::from_slice(&std::fs::read(&spec).unwrap()).unwrap();
}
