//! What `/proc` says about a live process: its resident memory, its open file descriptors and
//! whether it has exited (a zombie not yet reaped). Linux only; `None` when the process is gone.

/// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors (entries of `/proc/PID/fd`).
pub fn open_fds(pid: i32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.count() as u64)
}

/// Whether the process has exited and waits to be reaped (state `Z`), or is gone altogether.
pub fn exited(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // `pid (comm) S ...`: the command may hold spaces and parentheses, the state follows the
    // last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// Whether two processes run the same executable (`/proc/PID/exe`): a child between fork and
/// exec still runs its parent's.
pub fn same_program(a: i32, b: i32) -> bool {
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    matches!((exe(a), exe(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(open_fds(me).is_some_and(|n| n >= 3));
        assert!(!exited(me));
        assert!(exited(i32::MAX));
        assert!(same_program(me, me) && !same_program(me, i32::MAX));
    }
}
