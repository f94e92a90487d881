//! The whole deployment under load and faults, on lab machines (tests/fixtures/chaos.yaml:
//! two backends, two workers, PostgreSQL with a streaming standby, logd): `sagectl up` sets up
//! the standby; `sagectl bench chaos` runs people through a SIGKILLed backend and worker, a
//! PostgreSQL restart, logd killed twice, memcached stopped, and the primary's machine lost with
//! the standby promoted, and checks nothing was lost; the lost primary comes back as the new
//! standby; a backup is taken from it; both database machines are lost, made again, and the
//! backup restored: every account and workspace history is there.

use std::path::Path;
use std::time::Instant;

use sagews_testkit::lab::{self, Down, require, sagectl, scratch_inventory, ssh, text, up};
use serde_json::Value;

fn health<'a>(recap: &'a Value, host: &str) -> Vec<&'a str> {
    lab::host_entry(recap, host)["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["detail"].as_str())
        .collect()
}

fn psql(inv: &Path, host: &str, db: &str, sql: &str) -> String {
    ssh(
        inv,
        host,
        &[
            "runuser", "-u", "postgres", "--", "psql", "-XAtq", "-d", db, "-c", sql,
        ],
    )
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn the_deployment_loses_nothing_under_faults_and_comes_back_from_a_backup() {
    require("systemd-nspawn");
    let (tmp, inv) = scratch_inventory(&lab::fixtures().join("chaos.yaml"));
    let _down = Down(inv.clone());
    let started = Instant::now();
    let (o, recap) = up(&inv, &[]);
    assert!(o.status.success(), "up failed: {recap}\n{}", text(&o).1);
    eprintln!(
        "deployed 8 lab machines in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let on_db = health(&recap, "db").join("\n");
    assert!(
        on_db.contains("db2 streams through slot sagews_standby"),
        "{on_db}"
    );
    let on_db2 = health(&recap, "db2").join("\n");
    assert!(on_db2.contains("hot standby streaming from db"), "{on_db2}");
    // The standby is read-only and has what the primary has.
    assert_eq!(
        psql(&inv, "db2", "postgres", "select pg_is_in_recovery()").trim(),
        "t"
    );
    let refused = lab::sagectl()
        .args(["lab", "ssh"])
        .arg(&inv)
        .args([
            "db2",
            "--",
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-XAtq",
            "-d",
            "sagews",
            "-c",
            "create table t (x int)",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("read-only"),
        "{}",
        text(&refused).1
    );

    // The drill.
    let report = tmp.path().join("chaos.json");
    let o = sagectl()
        .args(["bench", "chaos"])
        .arg(&inv)
        .args(["--users", "12", "--gap", "15", "--json"])
        .arg(&report)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    eprintln!("{out}");
    assert!(
        o.status.success(),
        "the drill found problems:\n{out}\n{}",
        tail(&err, 60)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["faults"].as_array().unwrap().len(), 6, "{out}");
    for f in r["faults"].as_array().unwrap() {
        assert!(
            f["recovery_seconds"].as_u64().is_some(),
            "`{}`: the service did not work again within the gap:\n{out}",
            f["name"]
        );
    }
    assert!(r["problems"].as_array().unwrap().is_empty(), "{out}");
    // Nor was unsaved work lost: every cell acknowledged before a save or still in a session
    // that survived (taken over after the backends' restart) is in its file; only cells on the
    // killed worker since their last save may go (counted apart by the load, not here).
    assert_eq!(
        r["load"]["errors"]["lost_cell"]["count"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{out}"
    );
    assert!(r["load"]["saves"].as_u64().unwrap() > 0, "{out}");
    // The promote rewrote the inventory: db is the standby now.
    let text_inv = std::fs::read_to_string(&inv).unwrap();
    assert!(text_inv.contains("  standby: db\n"), "{text_inv}");

    // The lost primary comes back (a new machine at its address) as the new standby.
    let (o, recap) = up(&inv, &[]);
    assert!(
        o.status.success(),
        "up after the promote failed: {recap}\n{}",
        text(&o).1
    );
    let on_db = health(&recap, "db").join("\n");
    assert!(on_db.contains("hot standby streaming from db2"), "{on_db}");

    // A backup from the standby.
    let o = sagectl()
        .arg("backup")
        .arg(&inv)
        .arg("--to")
        .arg(tmp.path().join("backups"))
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "backup failed: {err}");
    let backup = std::path::PathBuf::from(out.trim());
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(backup.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["host"], "db", "{m}");
    assert_eq!(m["from_standby"], true, "{m}");
    let accounts = psql(
        &inv,
        "db2",
        "sagews",
        "select name from accounts order by name",
    );
    let histories = psql(
        &inv,
        "db2",
        "sagews",
        "select id, md5(bundle), version from workspaces order by id",
    );
    assert!(m["rows"]["sagews.accounts"].as_i64().unwrap() > 12, "{m}");

    // Both database machines lost; made again; the backup restored onto the fresh primary.
    for h in ["db", "db2"] {
        let o = sagectl()
            .args(["lab", "destroy"])
            .arg(&inv)
            .arg(h)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
    }
    let (o, recap) = up(&inv, &[]);
    assert!(
        o.status.success(),
        "up onto fresh database machines failed: {recap}\n{}",
        text(&o).1
    );
    let o = sagectl()
        .arg("restore")
        .arg(&inv)
        .arg(&backup)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "restore failed: {err}");
    eprintln!("{err}");
    assert_eq!(
        psql(
            &inv,
            "db2",
            "sagews",
            "select name from accounts order by name"
        ),
        accounts
    );
    // Every workspace with its whole history (the bundle) and version.
    assert_eq!(
        psql(
            &inv,
            "db2",
            "sagews",
            "select id, md5(bundle), version from workspaces order by id"
        ),
        histories
    );
    // The standby has it too, and the site works: a restored account signs in.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        psql(&inv, "db", "sagews", "select count(*) from accounts"),
        psql(&inv, "db2", "sagews", "select count(*) from accounts")
    );
    let user = &r["load"]["user_records"][0];
    let site = sagews_testkit::browser::Site {
        name: "sagews.chaos.test".into(),
        addr: "10.88.0.10:443".parse().unwrap(),
        ca: inv.parent().unwrap().join(".sagectl/chaos/ca.crt"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let creds =
        serde_json::json!({"name": user["account"], "password": user["password"]}).to_string();
    let res = rt.block_on(site.json("POST", "/api/signin", "", creds.as_bytes()));
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
}
