//! The emulator produces the profile it is asked for (root only; skipped otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dwcp_testbed::{Profile, Testbed, is_root};

/// The min and average RTT in ms of `ping -U` (user-to-user time: the delay stage sits after
/// the kernel's receive timestamp, TESTBED.md) from A to B.
fn ping_rtt_ms(tb: &Testbed, count: u32) -> (f64, f64) {
    let out = tb
        .cmd_a("ping")
        .args([
            "-U",
            "-q",
            "-n",
            "-i",
            "0.05",
            "-W",
            "2",
            "-c",
            &count.to_string(),
        ])
        .arg(tb.addr_b.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ping failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // rtt min/avg/max/mdev = a/b/c/d ms
    let line = text.lines().find(|l| l.contains("min/avg/max")).unwrap();
    let nums = line.split('=').nth(1).unwrap().trim();
    let mut n = nums.split('/').map(|x| x.parse::<f64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

#[test]
fn emulated_rtt_and_teardown() {
    if !is_root() {
        eprintln!("SKIPPED: the testbed needs root (network namespaces, TUN, tc)");
        return;
    }
    let profile = Profile {
        name: "test".into(),
        delay: Duration::from_millis(20),
        jitter: Duration::ZERO,
        loss: 0.0,
        rate_bps: Some(100_000_000),
    };
    let tb = Testbed::up(profile, 1).unwrap();
    // The emulator runs in user space: on a loaded host a probe can wait for a CPU, which
    // raises the average (49 ms seen under the test suite), never the minimum below the delay.
    let (min, avg) = ping_rtt_ms(&tb, 20);
    assert!(
        (40.0..46.0).contains(&min),
        "RTT min {min} ms, expected ~40"
    );
    assert!(avg < 80.0, "RTT average {avg} ms, expected ~40");
    let (ns_a, ns_b) = (tb.ns_a.clone(), tb.ns_b.clone());
    tb.down();
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(&ns_a) && !list.contains(&ns_b), "{list}");
}

#[test]
fn emulated_loss_rate() {
    if !is_root() {
        eprintln!("SKIPPED: the testbed needs root (network namespaces, TUN, tc)");
        return;
    }
    let profile = Profile {
        name: "test".into(),
        delay: Duration::from_millis(1),
        jitter: Duration::ZERO,
        loss: 0.10,
        rate_bps: None,
    };
    let tb = Testbed::up(profile, 7).unwrap();
    let out = tb
        .cmd_a("ping")
        .args(["-q", "-n", "-i", "0.002", "-W", "1", "-c", "1000"])
        .arg(tb.addr_b.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Both directions lose 10 %: ~19 % of echoes go unanswered.
    let loss: f64 = text
        .split(',')
        .find(|s| s.contains("packet loss"))
        .and_then(|s| s.trim().split('%').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((12.0..27.0).contains(&loss), "loss {loss} %: {text}");
    let sent = tb.stats[0]
        .packets
        .load(std::sync::atomic::Ordering::Relaxed);
    let dropped = tb.stats[0]
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent >= 1000, "{sent}");
    assert!((60..=140).contains(&dropped), "{dropped} of {sent} dropped");
    // What the devices dropped is read (and, at a ping every 2 ms, nothing).
    assert_eq!(tb.device_drops(), [Some(0), Some(0)]);
}

/// A testbed whose process died without its teardown left a namespace with a process in it:
/// the next testbed kills that process and removes the namespace (deleting the name alone
/// would leave the process running in a namespace nobody can see).
#[test]
fn a_dead_testbeds_namespace_and_what_ran_there_go() {
    if !is_root() {
        eprintln!("SKIPPED: the testbed needs root (network namespaces, TUN, tc)");
        return;
    }
    // Set up under the machine lock, as a testbed would be: a testbed of another test
    // starting meanwhile would clear the namespace before the sleep is in it.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/dwcp-testbed.lock")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the testbed lock stayed taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The process id of a process that has ended: a dead testbed's.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let name = format!("dwcp-tb{}-a", gone.id());
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&["netns", "add", &name]);
    // And one whose process id went to a process that runs (here init's): stale all the same.
    let reused = "dwcp-tb1-b";
    let _ = std::process::Command::new("ip")
        .args(["netns", "add", reused])
        .output();
    let mut orphan = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "60"])
        .spawn()
        .unwrap();
    // (`ip netns exec` becomes the sleep; it is in the namespace once `ip netns pids` lists it.)
    let listed = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&orphan.id().to_string())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !listed() {
        assert!(
            std::time::Instant::now() < deadline,
            "sleep never entered {name}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(lock);
    let tb = Testbed::up(Profile::named("dc").unwrap(), 1).unwrap();
    let status = orphan.wait().unwrap();
    assert!(!status.success(), "{status:?}");
    assert!(!std::path::Path::new(&format!("/var/run/netns/{name}")).exists());
    assert!(!std::path::Path::new(&format!("/var/run/netns/{reused}")).exists());
    tb.down();
}
