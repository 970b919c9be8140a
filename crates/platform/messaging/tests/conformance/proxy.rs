//! A TCP proxy in front of a broker that a test can cut off: while cut, open
//! connections are closed and new ones are dropped at once, as if the broker were
//! gone; restored, it forwards again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    /// `true` while cut off.
    cut: watch::Sender<bool>,
}

impl Proxy {
    /// Listens on a free port; forwards once [`forward_to`](Self::forward_to) is set
    /// (a broker that advertises its address needs the proxy's before it starts).
    pub async fn bind() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(None));
        let (cut, _) = watch::channel(false);
        let proxy = Proxy {
            addr,
            target: target.clone(),
            cut,
        };
        let cut = proxy.cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = *target.lock().unwrap();
                let (Some(to), false) = (to, *cut.borrow()) else {
                    continue; // dropped: the connection closes
                };
                let mut cut = cut.subscribe();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut client, mut upstream) = (client, upstream);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn forward_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = Some(target);
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}
