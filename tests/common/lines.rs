//! A child process's output pipe read line by line with every line kept, so
//! a test can wait for the line it wants and still show all the child said
//! when that line does not come.

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader, Lines},
    time::Instant,
};

/// One pipe of a child (its stdout or stderr) and what was read from it.
pub struct SeenLines<R> {
    lines: Lines<BufReader<R>>,
    /// Every line read so far, in order, for failure messages.
    pub seen: Vec<String>,
}

impl<R: AsyncRead + Unpin> SeenLines<R> {
    pub fn new(pipe: R) -> Self {
        Self {
            lines: BufReader::new(pipe).lines(),
            seen: Vec::new(),
        }
    }

    /// The next line (also kept), or why there is none by `deadline`.
    async fn next_by(&mut self, deadline: Instant) -> Result<String, &'static str> {
        match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                self.seen.push(line.clone());
                Ok(line)
            }
            Ok(Ok(None)) => Err("the output ended"),
            Ok(Err(_)) => Err("the output could not be read"),
            Err(_) => Err("no line in time"),
        }
    }

    /// The next line within `within`; the error says why there was none.
    pub async fn next(&mut self, within: Duration) -> Result<String, String> {
        let next = self.next_by(Instant::now() + within).await;
        next.map_err(|why| format!("{why} (waited up to {within:?})"))
    }

    /// Reads up to and including the first line containing `needle`, all
    /// within `within`; the error names the needle and why it did not come.
    pub async fn until(&mut self, needle: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let line = self
                .next_by(deadline)
                .await
                .map_err(|why| format!("no {needle:?} within {within:?}: {why}"))?;
            if line.contains(needle) {
                return Ok(());
            }
        }
    }

    /// Reads to the end of the pipe.
    pub async fn rest(&mut self) -> std::io::Result<()> {
        while let Some(line) = self.lines.next_line().await? {
            self.seen.push(line);
        }
        Ok(())
    }

    /// Everything read so far, one line a line.
    pub fn text(&self) -> String {
        self.seen.join("\n")
    }
}
