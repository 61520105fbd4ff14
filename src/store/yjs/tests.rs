//! The Yjs history's pure parts: edits, refusals, and fuzzing of the decoding path.

use super::*;

#[test]
fn a_text_edit_is_a_character_diff_and_merges_with_a_concurrent_one() {
    let server = Doc::new();
    let start = {
        let text = server.get_or_insert_text(TEXT);
        let mut t = server.transact_mut();
        text.insert(&mut t, 0, "hello world");
        t.encode_update_v1()
    };
    // A client with the same start types at the end meanwhile.
    let client = Doc::new();
    client
        .transact_mut()
        .apply_update(Update::decode_v1(&start).unwrap())
        .unwrap();
    let typed = {
        let text = client.get_or_insert_text(TEXT);
        let mut t = client.transact_mut();
        text.push(&mut t, "!");
        t.encode_update_v1()
    };
    // The server's whole-text write becomes an edit of the middle word.
    let edited = edit(&server, "hello world", "hello brave world");
    server
        .transact_mut()
        .apply_update(Update::decode_v1(&typed).unwrap())
        .unwrap();
    client
        .transact_mut()
        .apply_update(Update::decode_v1(&edited).unwrap())
        .unwrap();
    let read = |doc: &Doc| doc.get_or_insert_text(TEXT).get_string(&doc.transact());
    assert_eq!(read(&server), "hello brave world!");
    assert_eq!(read(&client), read(&server));
}

#[test]
fn non_ascii_text_is_edited_by_character() {
    let doc = Doc::new();
    {
        let text = doc.get_or_insert_text(TEXT);
        let mut t = doc.transact_mut();
        text.insert(&mut t, 0, "naïve café");
    }
    edit(&doc, "naïve café", "naïf café ☕");
    assert_eq!(
        doc.get_or_insert_text(TEXT).get_string(&doc.transact()),
        "naïf café ☕"
    );
}

#[test]
fn a_large_rewrite_is_a_few_operations() {
    let doc = Doc::new();
    let old: String = "lorem ipsum ".repeat(8_000);
    {
        let text = doc.get_or_insert_text(TEXT);
        let mut t = doc.transact_mut();
        text.insert(&mut t, 0, &old);
    }
    let new = format!("start {}{} end", &old[..40_000], &old[50_000..]);
    let started = std::time::Instant::now();
    edit(&doc, &old, &new);
    assert_eq!(
        doc.get_or_insert_text(TEXT).get_string(&doc.transact()),
        new
    );
    // One yrs operation per character (quadratic) took minutes for this.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn embeds_are_refused() {
    let client = Doc::new();
    let embed = {
        let text = client.get_or_insert_text(TEXT);
        let mut t = client.transact_mut();
        text.insert(&mut t, 0, "a");
        text.insert_embed(&mut t, 1, yrs::Any::from("image"));
        t.encode_update_v1()
    };
    let refused = integrate(
        &Doc::new(),
        Update::decode_v1(&embed).unwrap(),
        TextStats::default(),
    );
    assert!(matches!(
        refused,
        Err(StoreError::BadUpdate(BadUpdate::NotText))
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
    #[test]
    fn any_bytes_are_refused_or_integrated(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        let encoded = STANDARD.encode(&bytes);
        if let Ok(update) = decode(&encoded) {
            let _ = integrate(&Doc::new(), update, TextStats::default());
        }
    }

    #[test]
    fn a_real_update_mutated_is_refused_or_integrated(at in 0usize..64, value in proptest::prelude::any::<u8>()) {
        let doc = Doc::new();
        let mut update = {
            let text = doc.get_or_insert_text(TEXT);
            let mut t = doc.transact_mut();
            text.insert(&mut t, 0, "hello world, a real update");
            t.encode_update_v1()
        };
        let at = at % update.len();
        update[at] = value;
        // yrs's decoder panics on some of these (an assertion in its block ids):
        // `decode` turns that into a refusal.
        if let Ok(update) = decode(&STANDARD.encode(&update)) {
            let _ = integrate(&Doc::new(), update, TextStats::default());
        }
    }
}

#[test]
fn garbage_is_refused_before_anything_runs() {
    assert!(matches!(decode("not base64!"), Err(BadUpdate::NotBase64)));
    assert!(matches!(decode("AAEC/w=="), Err(BadUpdate::NotYjs)));
    assert!(decode_state_vector("%%").is_err());
}

/// A client's update inserting `chunk` at byte `at` of `doc`'s text.
fn typed(doc: &Doc, at: u32, chunk: &str) -> Update {
    let text = doc.get_or_insert_text(TEXT);
    let mut t = doc.transact_mut();
    text.insert(&mut t, at, chunk);
    Update::decode_v1(&t.encode_update_v1()).unwrap()
}

#[tokio::test]
async fn a_cached_document_whose_last_update_was_replaced_is_loaded_again() {
    let (_dir, db, _) = crate::db::test_database().await;
    let created = crate::store::document::create(&db, 1, 7, "t", "hello")
        .await
        .unwrap();
    let cache = Cache::default();
    let client = Doc::new();
    client
        .transact_mut()
        .apply_update(
            Update::decode_v1(
                &STANDARD
                    .decode(load(&db, created.id).await.unwrap().diff(None))
                    .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
    let applied = apply(&db, 1, created.id, typed(&client, 5, " world"), &cache)
        .await
        .unwrap();
    assert_eq!(applied.document.body, "hello world");
    let cached_id = cache
        .0
        .lock()
        .unwrap()
        .peek(&created.id)
        .unwrap()
        .last_update_id;

    // As after a rollback that the cache did not see: the update under that id is another
    // one (an SQLite id can be taken again), here an edit of the text as it was before.
    let before = {
        // `other` as of "hello": a fresh document from the first update only.
        let first = db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Sqlite,
                format!("SELECT update_data FROM document_updates WHERE document_id = {} ORDER BY id LIMIT 1", created.id),
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<String>("", "update_data")
            .unwrap();
        let doc = Doc::new();
        apply_stored(&doc, &first).unwrap();
        doc
    };
    let replacement = {
        let text = before.get_or_insert_text(TEXT);
        let mut t = before.transact_mut();
        text.insert(&mut t, 5, "!");
        STANDARD.encode(t.encode_update_v1())
    };
    db.execute_unprepared(&format!(
        "DELETE FROM document_updates WHERE id = {cached_id}; \
         INSERT INTO document_updates (id, document_id, channel_id, version, update_data) VALUES ({cached_id}, {}, 7, 2, '{replacement}'); \
         UPDATE documents SET body = 'hello!' WHERE id = {}",
        created.id, created.id
    ))
    .await
    .unwrap();

    // The next write builds on what is stored, not on the cached copy.
    let next = typed(&before, 0, ">");
    let applied = apply(&db, 1, created.id, next, &cache).await.unwrap();
    assert_eq!(applied.document.body, ">hello!");
    assert_eq!(load(&db, created.id).await.unwrap().text(), ">hello!");
}

#[tokio::test]
async fn a_batch_stores_each_update_with_its_version_or_nothing_when_one_is_refused() {
    let (_dir, db, _) = crate::db::test_database().await;
    let created = crate::store::document::create(&db, 1, 7, "t", "")
        .await
        .unwrap();
    let cache = Cache::default();
    let (a, b) = (Doc::new(), Doc::new());
    let other_type = {
        let doc = Doc::new();
        let map = doc.get_or_insert_map("other");
        let mut t = doc.transact_mut();
        yrs::Map::insert(&map, &mut t, "k", "v");
        Update::decode_v1(&t.encode_update_v1()).unwrap()
    };
    let count = || async {
        db.query_one_raw(Statement::from_string(
            DatabaseBackend::Sqlite,
            "SELECT COUNT(*) AS n FROM document_updates".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
    };
    let batch = vec![
        (1, typed(&a, 0, "a")),
        (1, other_type),
        (1, typed(&b, 0, "b")),
    ];
    match apply_all(&db, created.id, batch, &cache).await {
        Err(BatchError::Refused(1, StoreError::BadUpdate(BadUpdate::OtherTypes))) => {}
        other => panic!("the second is refused: {other:?}"),
    }
    assert_eq!(count().await, 0, "nothing of the batch was stored");
    // Two updates again, with a non-member's between: each stored with its own version
    // and position, the non-member's answered alone.
    db.execute_unprepared(
        "INSERT INTO users (id, name, email, password_hash) VALUES (2, 'Bob', 'bob@example.com', 'x')",
    )
    .await
    .unwrap();
    let batch = vec![
        (1, typed(&Doc::new(), 0, "a")),
        (2, typed(&Doc::new(), 0, "x")),
        (1, typed(&Doc::new(), 0, "c")),
    ];
    let outcomes = apply_all(&db, created.id, batch, &cache).await.unwrap();
    let first = outcomes[0].as_ref().unwrap();
    assert!(matches!(outcomes[1], Err(StoreError::Forbidden(_))));
    let last = outcomes[2].as_ref().unwrap();
    assert_eq!((first.document.version, last.document.version), (2, 3));
    assert!(first.position.unwrap() < last.position.unwrap());
    assert_eq!(count().await, 2);
    let text = load(&db, created.id).await.unwrap().text();
    assert!(text == "ac" || text == "ca", "{text}");
    let row = crate::store::document::find(&db, created.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.body.as_str(), row.version), (text.as_str(), 3));
}

/// A document whose text is `text`, and its measures.
fn document_of(text: &str) -> (Doc, TextStats) {
    let doc = Doc::new();
    {
        let body = doc.get_or_insert_text(TEXT);
        let mut t = doc.transact_mut();
        body.insert(&mut t, 0, text);
    }
    (doc, TextStats::of(text))
}

/// An update from a copy of `doc` that does `edit` to the copy's text.
fn edited(doc: &Doc, edit: impl FnOnce(&yrs::TextRef, &mut yrs::TransactionMut)) -> Update {
    let copy = Doc::new();
    let state = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    copy.transact_mut()
        .apply_update(Update::decode_v1(&state).unwrap())
        .unwrap();
    let text = copy.get_or_insert_text(TEXT);
    let mut t = copy.transact_mut();
    edit(&text, &mut t);
    Update::decode_v1(&t.encode_diff_v1(&doc.transact().state_vector())).unwrap()
}

#[test]
fn a_nul_cannot_be_added_but_one_already_there_stops_no_edit() {
    let (doc, stats) = document_of("a\0b");
    let typed = edited(&doc, |text, t| text.insert(t, 3, "c"));
    assert!(integrate(&doc, typed, stats).unwrap().0.is_some());
    let stats = TextStats::of("a\0bc");
    let nul = edited(&doc, |text, t| text.insert(t, 0, "\0"));
    assert!(matches!(
        integrate(&doc, nul, stats),
        Err(StoreError::BadUpdate(BadUpdate::Nul))
    ));
}

#[test]
fn past_the_limit_a_text_can_be_cut_but_not_grown_even_by_narrower_characters() {
    let over = "x".repeat(MAX_TEXT_CHARS + 1);
    let (doc, stats) = document_of(&over);
    let cut = edited(&doc, |text, t| text.remove_range(t, 0, 1));
    let (stored, after) = integrate(&doc, cut, stats).unwrap();
    assert!(stored.is_some());
    let grown = edited(&doc, |text, t| text.insert(t, 0, "y"));
    assert!(matches!(
        integrate(&doc, grown, after),
        Err(StoreError::BadUpdate(BadUpdate::TooLong))
    ));
    // 60,000 two-byte characters become 120,000 one-byte ones: as many bytes, more
    // characters than allowed.
    let wide = "é".repeat(60_000);
    let (doc, stats) = document_of(&wide);
    let narrow = edited(&doc, |text, t| {
        text.remove_range(t, 0, wide.len() as u32);
        text.insert(t, 0, &"a".repeat(120_000));
    });
    assert!(matches!(
        integrate(&doc, narrow, stats),
        Err(StoreError::BadUpdate(BadUpdate::TooLong))
    ));
}
