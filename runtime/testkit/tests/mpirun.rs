//! The Jacobi scenario under a real `mpirun` (Open MPI): rank and size come from
//! OMPI_COMM_WORLD_RANK/SIZE, and the only GALLOCY_* variable is GALLOCY_COORDINATOR.
//! Needs Debian's openmpi-bin; set GALLOCY_SKIP_MPI=1 to skip where it cannot be installed.

use gallocy_testkit::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn jacobi_under_mpirun() {
    let Some(mpirun) = find_in_path("mpirun") else {
        if std::env::var("GALLOCY_SKIP_MPI").as_deref() == Ok("1") {
            eprintln!("mpirun not found; skipped because GALLOCY_SKIP_MPI=1");
            return;
        }
        panic!(
            "mpirun not found in PATH: install Open MPI (`apt-get install -y openmpi-bin`), \
             or set GALLOCY_SKIP_MPI=1 to skip this test"
        );
    };
    let _g = serial();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(&mpirun);
    clean_env(&mut cmd);
    cmd.env("GALLOCY_COORDINATOR", &coordinator);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    cmd.args(["-n", "4", "--oversubscribe", "--bind-to", "none", "-x", "GALLOCY_COORDINATOR"]);
    if let Some(t) = transport() {
        cmd.env("GALLOCY_TRANSPORT", t).args(["-x", "GALLOCY_TRANSPORT"]);
    }
    cmd.arg(scenario()).args(["jacobi", "--n", "128", "--iters", "100", "--threads", "2"]);
    let label = format!("mpirun -n 4 --oversubscribe (GALLOCY_COORDINATOR={coordinator})");
    let p = run(&label, &mut cmd, limit(Duration::from_secs(180)));
    assert!(p.success(), "{label}: {}\n{}", describe(p.status), p.report());
    for r in 0..4 {
        let pass = format!("rank {r}: jacobi ok");
        assert!(p.stdout.contains(&pass), "{label}: no {pass:?} line\n{}", p.report());
    }
    assert!(p.stdout.contains("identical to the sequential reference"), "{}", p.report());
}
