//! `/api/v1/loops`: create with every validation, list with cursors,
//! ownership, archive; body limits, unknown routes and the stream endpoints.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{TestApp, assert_error};

#[tokio::test]
async fn create_with_defaults_and_read_back() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    // An empty body means `{}`.
    let resp = app
        .request(Method::POST, "/api/v1/loops", &bearer)
        .send()
        .await
        .unwrap();
    let (status, created) = crate::support::read(resp).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("loop_") && id.len() == 41, "{id}");
    assert_eq!(created["title"], "untitled");
    assert_eq!(created["created_by"], "alice");
    assert_eq!(created["archived"], false);
    assert_eq!(created["archived_at"], Value::Null);
    assert_eq!(created["metadata"], json!({}));
    assert_eq!(created["profiles"], json!([]));
    assert_eq!(created["vault"], "default");
    assert_eq!(created["repo"], Value::Null);
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, got) = app.get(&format!("/api/v1/loops/{id}"), &bearer).await;
    assert_eq!(status, StatusCode::OK);
    for (k, v) in created.as_object().unwrap() {
        assert_eq!(&got[k], v, "field {k}");
    }
    assert_eq!(got["busy"], false);
    assert_eq!(got["queue_depth"], 0);
    assert_eq!(got["turn_count"], 0);
    assert_eq!(got["current_turn"], Value::Null);

    // Stored as loops/<uuid>/meta.json, or as the database's row.
    let uuid = id.strip_prefix("loop_").unwrap();
    let meta: Value = match app.database_url() {
        None => serde_json::from_slice(
            &std::fs::read(app.dir.join("loops").join(uuid).join("meta.json")).unwrap(),
        )
        .unwrap(),
        Some(url) => crate::pg::loop_record(&url, uuid.parse().unwrap()).unwrap(),
    };
    assert_eq!(meta["id"], id);
}

#[tokio::test]
async fn create_validates_every_field() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let create = |body: Value| app.post("/api/v1/loops", &bearer, body);
    let bad = |code| {
        move |got: (StatusCode, Value)| assert_error(&got, 400, "invalid_request_error", code)
    };

    bad("title_too_long")(create(json!({"title": "t".repeat(201)})).await);
    assert_eq!(
        create(json!({"title": "é".repeat(200)})).await.0,
        StatusCode::CREATED
    );
    bad("metadata_invalid")(create(json!({"metadata": ["a"]})).await);
    bad("metadata_invalid")(create(json!({"metadata": {"n": 1}})).await);
    bad("metadata_invalid")(create(json!({"metadata": "x"})).await);
    bad("metadata_too_large")(create(json!({"metadata": {"k": "v".repeat(16 * 1024)}})).await);
    let (status, ok) = create(json!({"metadata": {"chat": "C123", "thread": "42"}})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ok["metadata"], json!({"chat": "C123", "thread": "42"}));
    bad("invalid_body")(create(json!({"title": 7})).await);
    bad("profile_not_found")(create(json!({"profiles": ["nope"]})).await);
    bad("vault_not_found")(create(json!({"vault": "nope"})).await);
    bad("repo_not_found")(create(json!({"repo": "nope"})).await);
    bad("profile_not_found")(create(json!({"profiles": ["../../etc"]})).await);

    // Broken JSON, and bytes that are not UTF-8 (inside a string and as a
    // whole): all `invalid_json`.
    for raw in [
        b"{".to_vec(),
        b"not json".to_vec(),
        b"{\"title\": \"a\",}".to_vec(),
        b"[1,".to_vec(),
        b"{\"title\": \"\xff\xfe\"}".to_vec(),
        vec![0xff, 0xfe, 0x00],
    ] {
        let resp = app
            .request(Method::POST, "/api/v1/loops", &bearer)
            .body(raw)
            .send()
            .await
            .unwrap();
        bad("invalid_json")(crate::support::read(resp).await);
    }
}

#[tokio::test]
async fn profiles_vaults_and_repos_that_exist_are_accepted() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let d = &app.dir;
    std::fs::create_dir_all(d.join("profiles/reviewer")).unwrap();
    std::fs::write(d.join("profiles/reviewer/CLAUDE.md"), "Review carefully.\n").unwrap();
    std::fs::create_dir_all(d.join("vaults")).unwrap();
    std::fs::write(d.join("vaults/ci.env"), "TOKEN=x\n").unwrap();
    std::fs::write(d.join("vaults/ci.users"), "# granted to\nalice\n").unwrap();
    let repo = d.join("repos/app");
    std::fs::create_dir_all(&repo).unwrap();
    let git = std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(&repo)
        .status()
        .unwrap();
    assert!(git.success());
    let (status, body) = app
        .post(
            "/api/v1/loops",
            &bearer,
            json!({"title": "work", "profiles": ["reviewer"], "vault": "ci", "repo": "app"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["profiles"], json!(["reviewer"]));
    assert_eq!(body["vault"], "ci");
    assert_eq!(body["repo"], "app");
    // Bob was not granted `ci`: to him it does not exist.
    let bob = app.bearer("bob").await;
    let got = app
        .post("/api/v1/loops", &bob, json!({"vault": "ci"}))
        .await;
    crate::support::assert_error(&got, 400, "invalid_request_error", "vault_not_found");
    let unknown = app
        .post("/api/v1/loops", &bob, json!({"vault": "nope"}))
        .await;
    assert_eq!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .replace("ci", "?"),
        unknown.1["error"]["message"]
            .as_str()
            .unwrap()
            .replace("nope", "?")
    );
}

fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn list_pages_newest_first_with_cursors_and_clamps_the_limit() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let mut made = vec![];
    for i in 0..105 {
        made.push(
            app.create_loop(&bearer, json!({"title": format!("l{i}")}))
                .await,
        );
    }
    made.reverse(); // newest first

    let (_, first) = app.get("/api/v1/loops", &bearer).await;
    assert_eq!(ids(&first), made[..20]);
    assert_eq!(first["first_id"], made[0].as_str());
    assert_eq!(first["last_id"], made[19].as_str());
    assert_eq!(first["has_more"], true);

    let (_, big) = app.get("/api/v1/loops?limit=1000", &bearer).await;
    assert_eq!(ids(&big).len(), 100);
    assert_eq!(big["has_more"], true);

    let (_, next) = app
        .get(
            &format!("/api/v1/loops?limit=3&after={}", made[100]),
            &bearer,
        )
        .await;
    assert_eq!(ids(&next), made[101..104]);
    assert_eq!(next["has_more"], true);
    let (_, end) = app
        .get(
            &format!("/api/v1/loops?limit=3&after={}", made[102]),
            &bearer,
        )
        .await;
    assert_eq!(ids(&end), made[103..105]);
    assert_eq!(end["has_more"], false);

    // before: the items just newer than the cursor, still newest first.
    let (_, back) = app
        .get(
            &format!("/api/v1/loops?limit=3&before={}", made[10]),
            &bearer,
        )
        .await;
    assert_eq!(ids(&back), made[7..10]);
    assert_eq!(back["has_more"], true);
    let (_, top) = app
        .get(
            &format!("/api/v1/loops?limit=3&before={}", made[2]),
            &bearer,
        )
        .await;
    assert_eq!(ids(&top), made[0..2]);
    assert_eq!(top["has_more"], false);

    let (_, empty) = app
        .get(&format!("/api/v1/loops?after={}", made[104]), &bearer)
        .await;
    assert_eq!(
        empty,
        json!({"data": [], "first_id": null, "last_id": null, "has_more": false})
    );

    let bad_query = app.get("/api/v1/loops?limit=lots", &bearer).await;
    assert_error(&bad_query, 400, "invalid_request_error", "invalid_query");
    let bad_cursor = app.get("/api/v1/loops?after=loop_nope", &bearer).await;
    assert_error(&bad_cursor, 400, "invalid_request_error", "invalid_cursor");
}

#[tokio::test]
async fn archive_is_idempotent_and_hides_the_loop_from_the_default_list() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let keep = app.create_loop(&bearer, json!({"title": "keep"})).await;
    let gone = app.create_loop(&bearer, json!({"title": "gone"})).await;
    let path = format!("/api/v1/loops/{gone}");
    assert_eq!(app.delete(&path, &bearer).await.0, StatusCode::NO_CONTENT);
    let (_, first) = app.get(&path, &bearer).await;
    assert_eq!(first["archived"], true);
    let archived_at = first["archived_at"].as_str().unwrap().to_owned();
    assert_eq!(app.delete(&path, &bearer).await.0, StatusCode::NO_CONTENT);
    let (_, second) = app.get(&path, &bearer).await;
    assert_eq!(
        second["archived_at"],
        archived_at.as_str(),
        "archiving twice keeps the first time"
    );

    let (_, default) = app.get("/api/v1/loops", &bearer).await;
    assert_eq!(ids(&default), [keep.as_str()]);
    let (_, all) = app.get("/api/v1/loops?archived=true", &bearer).await;
    assert_eq!(ids(&all), [gone.as_str(), keep.as_str()]);
    let (_, only_live) = app.get("/api/v1/loops?archived=false", &bearer).await;
    assert_eq!(ids(&only_live), [keep]);
}

#[tokio::test]
async fn users_only_see_and_drive_their_own_loops() {
    let app = TestApp::start().await;
    let alice = app.bearer("alice").await;
    let bob = app.session("bob").await;
    let id = app.create_loop(&alice, json!({"title": "alice's"})).await;
    let (_, bobs) = app.get("/api/v1/loops?archived=true", &bob).await;
    assert_eq!(bobs["data"], json!([]));
    let path = format!("/api/v1/loops/{id}");
    let forbidden = |got| assert_error(&got, 403, "permission_error", "not_loop_owner");
    forbidden(app.get(&path, &bob).await);
    forbidden(app.delete(&path, &bob).await);
    forbidden(
        app.post(&format!("{path}/messages"), &bob, json!({"content": "hi"}))
            .await,
    );
    forbidden(app.get(&format!("{path}/events"), &bob).await);
    forbidden(
        app.post(&format!("{path}/interrupt"), &bob, json!({}))
            .await,
    );
    forbidden(app.get(&format!("{path}/turns"), &bob).await);
    forbidden(
        app.post(
            &format!("{path}/choices/choice_x"),
            &bob,
            json!({"allow": true}),
        )
        .await,
    );
    // Alice's loop is untouched.
    assert_eq!(app.get(&path, &alice).await.1["archived"], false);
    // A cursor from someone else's loop reveals nothing.
    let cursor = app.get(&format!("/api/v1/loops?after={id}"), &bob).await;
    assert_error(&cursor, 400, "invalid_request_error", "invalid_cursor");
}

#[tokio::test]
async fn unknown_and_malformed_loop_ids_are_not_found() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let unknown = format!("loop_{}", "0b7e4a4e-7a55-4a8c-9d7e-0f4b1f2a9c11");
    for id in [
        unknown.as_str(),
        "loop_123",
        "whatever",
        "LOOP_0B7E4A4E-7A55-4A8C-9D7E-0F4B1F2A9C11",
    ] {
        let path = format!("/api/v1/loops/{id}");
        let nf = |got| assert_error(&got, 404, "not_found_error", "loop_not_found");
        nf(app.get(&path, &bearer).await);
        nf(app.delete(&path, &bearer).await);
        nf(app
            .post(
                &format!("{path}/messages"),
                &bearer,
                json!({"content": "x"}),
            )
            .await);
    }
}

#[tokio::test]
async fn bodies_over_two_mebibytes_are_refused() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let huge = format!("{{\"title\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    let resp = app
        .request(Method::POST, "/api/v1/loops", &bearer)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_error(
        &crate::support::read(resp).await,
        413,
        "invalid_request_error",
        "body_too_large",
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_error_envelope() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let nf = app.get("/api/v1/nothing-here", &bearer).await;
    assert_error(&nf, 404, "not_found_error", "route_not_found");
    let put = app
        .call(Method::PUT, "/api/v1/loops", &bearer, Some(json!({})))
        .await;
    assert_error(&put, 405, "invalid_request_error", "method_not_allowed");
}

#[tokio::test]
async fn an_internal_error_says_nothing_internal() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    // Make the loops directory unusable behind the server's back (root can
    // write anywhere, so replace it with a file).
    let loops = app.dir.join("loops");
    std::fs::rename(&loops, app.dir.join("loops.moved")).unwrap();
    std::fs::write(&loops, "not a directory").unwrap();
    let got = app
        .post("/api/v1/loops", &bearer, json!({"title": "x"}))
        .await;
    assert_error(&got, 500, "internal_error", "internal_error");
    let message = got.1["error"]["message"].as_str().unwrap();
    assert!(!message.contains(app.dir.to_str().unwrap()), "{message}");
    assert!(!message.to_lowercase().contains("directory"), "{message}");
}

#[tokio::test]
async fn lists_search_titles_and_show_what_waits() {
    let app = TestApp::start().await;
    let bearer = app.bearer("alice").await;
    let deploy = app
        .create_loop(&bearer, json!({"title": "Deploy the API"}))
        .await;
    app.create_loop(&bearer, json!({"title": "release notes"}))
        .await;
    app.create_loop(&bearer, json!({"title": "API docs"})).await;
    let titles = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["title"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, found) = app.get("/api/v1/loops?q=api", &bearer).await;
    assert_eq!(titles(&found), ["API docs", "Deploy the API"]);
    let (_, found) = app.get("/api/v1/loops?q=%20NOTES%20", &bearer).await;
    assert_eq!(titles(&found), ["release notes"]);
    let (_, none) = app.get("/api/v1/loops?q=zzz", &bearer).await;
    assert_eq!(none["data"], json!([]));
    let long = "x".repeat(201);
    crate::support::assert_error(
        &app.get(&format!("/api/v1/loops?q={long}"), &bearer).await,
        400,
        "invalid_request_error",
        "invalid_query",
    );
    // Bob's loops never match alice's search.
    let bob = app.bearer("bob").await;
    assert_eq!(
        app.get("/api/v1/loops?q=api", &bob).await.1["data"],
        json!([])
    );

    // A loop waiting on a choice says which in the list.
    let mut stream = app.send(&bearer, &deploy, "/permission make deploy").await;
    let asked = stream.until("requires_choice").await.pop().unwrap();
    let (_, list) = app.get("/api/v1/loops?q=deploy", &bearer).await;
    assert_eq!(
        list["data"][0]["pending_choice_id"],
        asked.data["choice_id"]
    );
    assert_eq!(list["data"][0]["busy"], true);
    let (_, others) = app.get("/api/v1/loops?q=notes", &bearer).await;
    assert!(others["data"][0].get("pending_choice_id").is_none());
}
