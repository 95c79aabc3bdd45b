//! The job-wide barrier, as one thread of a joined process waits in it.

use crate::job::runtime::{fatal, Runtime};
use crate::protocol::barrier::COORDINATOR;
use crate::protocol::Msg;

/// Waits until every rank of the job has reached this barrier.
pub fn wait_for_all(rt: &Runtime) {
    let epoch = rt.collectives().next_barrier_epoch();
    rt.send_from_app(COORDINATOR, Msg::BarrierArrive { epoch });
    if rt.collectives().sync().wait_barrier(epoch).is_err() {
        fatal(
            rt,
            &format!(
                "rank {COORDINATOR}, the barrier's coordinator, left the job (gallocy_finalize) while this rank waits in barrier {epoch}: every rank must call gallocy_barrier equally often"
            ),
        );
    }
}
