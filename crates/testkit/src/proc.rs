//! A running process as the tests and the bench measure it: resident
//! memory, open files and CPU time (leaks, per-socket costs, CPU per
//! notification), plus the few system-wide figures the bench prints.

use procfs::{
    process::{all_processes, ClearRefs, LimitValue, Process},
    Current, CurrentSI, KernelStats, LoadAverage, ProcResult,
};

/// Which process to read: the bridge (or broker) by pid, or the caller
/// itself (the bench's own cost).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pid {
    Of(u32),
    Myself,
}

impl Pid {
    fn process(self) -> ProcResult<Process> {
        match self {
            Pid::Of(pid) => Process::new(pid as i32),
            Pid::Myself => Process::myself(),
        }
    }
}

/// Resident memory (VmRSS) in bytes: the figure per socket and the one a
/// leak test watches.
pub fn rss_bytes(pid: Pid) -> ProcResult<u64> {
    Ok(pid.process()?.status()?.vmrss.unwrap_or(0) * 1024)
}

/// Peak resident memory (VmHWM) in bytes since the process started or the
/// last [`reset_peak_rss`]: what a burst held at once.
pub fn peak_rss_bytes(pid: Pid) -> ProcResult<u64> {
    Ok(pid.process()?.status()?.vmhwm.unwrap_or(0) * 1024)
}

/// Restarts the peak-RSS count, so a phase's peak is its own.
pub fn reset_peak_rss(pid: Pid) -> ProcResult<()> {
    pid.process()?.clear_refs(ClearRefs::PeakRSS)
}

/// Open file descriptors: sockets and files a leak would leave behind.
pub fn open_fds(pid: Pid) -> ProcResult<u64> {
    Ok(pid.process()?.fd_count()? as u64)
}

/// User plus system CPU time so far, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: Pid) -> ProcResult<u64> {
    let stat = pid.process()?.stat()?;
    Ok(stat.utime + stat.stime)
}

/// This process's threads named `comm` (`lapin-io-loop`, a runtime's
/// `thread_name`): what a consumer running inside the bench costs, apart
/// from the bench's own publisher.
pub fn my_threads_named(comm: &str) -> Vec<u32> {
    let Ok(tasks) = Process::myself().and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| t.stat().is_ok_and(|s| s.comm == comm))
        .map(|t| t.tid as u32)
        .collect()
}

/// User plus system CPU time of some of this process's threads so far, in
/// clock ticks; a thread that is gone counts nothing.
pub fn my_threads_cpu_ticks(tids: &[u32]) -> ProcResult<u64> {
    let me = Process::myself()?;
    Ok(tids
        .iter()
        .filter_map(|tid| me.task_from_tid(*tid as i32).ok()?.stat().ok())
        .map(|stat| stat.utime + stat.stime)
        .sum())
}

/// The pids whose command name is `comm` (`beam.smp`, `postgres`): the
/// broker's and the database's CPU use beside the bridge's.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(all) = all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter(|p| p.stat().is_ok_and(|s| s.comm == comm))
        .map(|p| p.pid as u32)
        .collect()
}

/// This process's soft limit on open files (None: unlimited or unknown),
/// so a run that cannot fit is refused before it starts.
pub fn open_files_limit() -> Option<u64> {
    match Process::myself()
        .ok()?
        .limits()
        .ok()?
        .max_open_files
        .soft_limit
    {
        LimitValue::Value(v) => Some(v),
        LimitValue::Unlimited => None,
    }
}

/// The 1-minute load average, as `uptime` prints it: other users of the
/// machine show here.
pub fn load_average() -> Option<f32> {
    LoadAverage::current().ok().map(|l| l.one)
}

/// The whole machine's CPU time so far, in clock ticks, and the share of
/// it the hypervisor gave to other guests (steal): a run during which the
/// host took CPU away is slower for reasons no code of ours controls, and
/// its figures say so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCpu {
    pub total: u64,
    pub steal: u64,
}

impl HostCpu {
    /// The machine's counters now (None where /proc/stat cannot be read).
    pub fn now() -> Option<Self> {
        let t = KernelStats::current().ok()?.total;
        let opt = |v: Option<u64>| v.unwrap_or(0);
        let steal = opt(t.steal);
        let total = t.user + t.nice + t.system + t.idle;
        let total = total + opt(t.iowait) + opt(t.irq) + opt(t.softirq) + steal;
        Some(Self { total, steal })
    }

    /// Steal as a percentage of all the machine's CPU time since `earlier`.
    pub fn steal_percent_since(&self, earlier: &Self) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)?;
        let steal = self.steal.saturating_sub(earlier.steal);
        Some(steal as f64 * 100.0 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests take turns: the fd count below would otherwise see the
    /// other one's reads of /proc open and close (it failed that way in a
    /// full `scripts/test` run: 9 open files instead of 10).
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn reads_this_process() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        assert!(rss_bytes(Pid::Myself).unwrap() > 0);
        assert!(peak_rss_bytes(Pid::Myself).unwrap() >= rss_bytes(Pid::Myself).unwrap() / 2);
        let before = open_fds(Pid::Myself).unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(open_fds(Pid::Myself).unwrap(), before + 1);
        drop(file);
        let me = Pid::Of(std::process::id());
        assert!(cpu_ticks(me).unwrap() <= cpu_ticks(Pid::Myself).unwrap());
        assert!(open_files_limit().is_none_or(|l| l > 0));
        assert!(load_average().is_some_and(|l| l >= 0.0));
    }

    #[test]
    fn steal_is_a_share_of_the_machine_time_between_two_readings() {
        let before = HostCpu {
            total: 1_000,
            steal: 10,
        };
        let after = HostCpu {
            total: 1_400,
            steal: 110,
        };
        assert_eq!(after.steal_percent_since(&before), Some(25.0));
        assert_eq!(before.steal_percent_since(&before), None);
        let now = HostCpu::now().expect("/proc/stat");
        assert!(now.total > 0 && now.steal <= now.total);
    }

    #[test]
    fn finds_processes_by_name() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let me = procfs::process::Process::myself()
            .unwrap()
            .stat()
            .unwrap()
            .comm;
        assert!(pids_named(&me).contains(&std::process::id()));
        assert!(pids_named("no-such-command").is_empty());
        assert!(rss_bytes(Pid::Of(u32::MAX >> 1)).is_err());
    }

    #[test]
    fn a_named_thread_is_found_and_its_cpu_counted_apart() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::Builder::new()
            .name("testkit-busy".into())
            .spawn(move || {
                // Spin until this thread has used 5 ticks (50 ms) of CPU,
                // however busy the machine is.
                let me = my_threads_named("testkit-busy");
                let started = std::time::Instant::now();
                while my_threads_cpu_ticks(&me).unwrap_or(0) < 5
                    && started.elapsed() < std::time::Duration::from_secs(20)
                {
                    std::hint::black_box(started.elapsed());
                }
                ready_tx.send(()).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        ready_rx.recv().unwrap();
        let tids = my_threads_named("testkit-busy");
        assert_eq!(tids.len(), 1, "one thread of that name");
        let ticks = my_threads_cpu_ticks(&tids).unwrap();
        assert!(ticks >= 5, "it spun for 5 ticks, counted {ticks}");
        let mine = my_threads_cpu_ticks(&[std::process::id()]).unwrap();
        assert!(mine < ticks, "the main thread did not spin: {mine} ticks");
        drop(stop_tx);
        busy.join().unwrap();
        // `join` returns when the thread has cleared its tid, a moment
        // before the kernel drops its /proc entry (this failed once in
        // twenty runs when read at once).
        let gone_by = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while my_threads_cpu_ticks(&tids).unwrap() != 0 && std::time::Instant::now() < gone_by {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            my_threads_cpu_ticks(&tids).unwrap(),
            0,
            "a thread that is gone counts nothing"
        );
    }
}
