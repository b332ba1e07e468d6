use std::{io::{Read, Write}, net::{TcpListener, TcpStream}, os::fd::AsFd, time::Duration};

#[tokio::test(flavor = "multi_thread")]
async fn probe() {
    let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Debug).try_init();
    let progs = zc_user::ebpf::Programs::load().expect("load");
    let srv = TcpListener::bind("127.0.0.1:0").unwrap();
    let rl = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(rl.local_addr().unwrap()).unwrap();
    client.write_all(b"early").unwrap();
    let (a, _) = rl.accept().unwrap();
    let b = TcpStream::connect(srv.local_addr().unwrap()).unwrap();
    let (mut s, _) = srv.accept().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (ka, kb) = progs.pair_relay(a.as_fd(), b.as_fd()).unwrap();
    println!("keys {ka:?} {kb:?}");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"early");
    client.write_all(b"hello").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    s.write_all(b"world").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    println!("{:?} {:?}", progs.counters(&ka), progs.counters(&kb));
    // logging: unpaired socket in RELAY
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c2 = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
    let (s2, _) = l2.accept().unwrap();
    progs.insert_unpaired_relay(&s2).unwrap();
    c2.write_all(b"x").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("counts {:?}", progs.entry_counts());
}
