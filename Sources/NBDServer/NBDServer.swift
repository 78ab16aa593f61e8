import CairnCore
import NIOCore
import NIOPosix
import Synchronization

/// Limits and threads of an `NBDServer`.
package struct NBDServerOptions: Sendable {
    /// A client that has not finished negotiating (reached transmission) by then is closed.
    package var negotiationTimeout: Duration
    /// Largest READ or WRITE payload accepted (also advertised as the maximum block size);
    /// clamped to 512 B ... 1 GiB.
    package var maxPayload: Int
    /// Requests of one connection being worked on or whose reply is not yet written; at the
    /// limit the server stops reading from that client.
    package var maxInFlight: Int
    /// Threads doing block I/O (source reads, extents, device writes).
    package var ioThreads: Int
    /// Event loop threads (sockets and protocol only).
    package var eventLoopThreads: Int
    /// Most descriptors in one BLOCK_STATUS reply.
    package var maxBlockStatusDescriptors: Int

    package init(negotiationTimeout: Duration = .seconds(10), maxPayload: Int = 32 << 20, maxInFlight: Int = 16,
                 ioThreads: Int = max(4, System.coreCount), eventLoopThreads: Int = 1, maxBlockStatusDescriptors: Int = 4096) {
        self.negotiationTimeout = negotiationTimeout
        self.maxPayload = min(max(512, maxPayload), 1 << 30)
        self.maxInFlight = max(1, maxInFlight)
        self.ioThreads = max(1, ioThreads)
        self.eventLoopThreads = max(1, eventLoopThreads)
        self.maxBlockStatusDescriptors = max(1, maxBlockStatusDescriptors)
    }
}

/// An NBD server (fixed newstyle, structured replies, `base:allocation`) for a set of exports,
/// on unix sockets and TCP. See docs/NBD-SERVER.md for what it implements.
///
/// It owns its event loops and I/O threads; `shutdown()` closes every listener and connection
/// and stops the threads. Call it from outside the server's own threads.
package final class NBDServer: Sendable {
    private let shared: NBDServerShared
    private let group: MultiThreadedEventLoopGroup

    /// Listeners and connections; a separate object so that closures running on the event
    /// loops never hold the server itself (its deinit must not run on a loop thread).
    private let registry = NBDConnectionRegistry()

    package init(exports: [NBDExport], options: NBDServerOptions = .init()) {
        let pool = NIOThreadPool(numberOfThreads: options.ioThreads)
        pool.start()
        shared = NBDServerShared(exports: exports, options: options, pool: pool)
        group = MultiThreadedEventLoopGroup(numberOfThreads: options.eventLoopThreads)
    }

    /// Connections currently open (negotiating or transmitting).
    package var connectionCount: Int { registry.connectionCount }

    /// Listens on a unix socket at `path` (an existing socket file there is replaced).
    package func listen(unixSocket path: String) throws {
        let channel = try run { try self.bootstrap().bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait() }
        try register(channel)
    }

    /// Listens on TCP `host:port` (loopback by default); returns the bound port (useful with 0).
    @discardableResult
    package func listen(host: String = "127.0.0.1", port: Int) throws -> Int {
        let channel = try run {
            try self.bootstrap()
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .bind(host: host, port: port).wait()
        }
        try register(channel)
        return channel.localAddress?.port ?? port
    }

    /// Closes every listener and connection and stops the threads. Idempotent.
    package func shutdown() {
        guard let (listeners, connections) = registry.shutDown() else { return }
        for c in listeners { try? c.close().wait() }
        for c in connections { try? c.close().wait() }
        try? shared.pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
    }

    private func bootstrap() -> ServerBootstrap {
        let shared = self.shared
        let registry = self.registry
        return ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 128)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard registry.track(channel) else { throw ChannelError.ioOnClosedChannel }
                    try channel.pipeline.syncOperations.addHandler(NBDConnectionHandler(shared: shared))
                }
            }
    }

    private func register(_ channel: any Channel) throws {
        if !registry.addListener(channel) {
            try? channel.close().wait()
            throw CairnError(.usage, "the NBD server was shut down")
        }
    }

    private func run<T>(_ body: () throws -> T) throws -> T {
        guard !registry.isShutDown else { throw CairnError(.usage, "the NBD server was shut down") }
        do {
            return try body()
        } catch let error as CairnError {
            throw error
        } catch {
            throw CairnError(.io, "cannot listen: \(error)", hint: "check that the address is free and the directory writable")
        }
    }

    deinit {
        shutdown()
    }
}

/// The open listeners and connections of one server.
final class NBDConnectionRegistry: Sendable {
    private struct State {
        var listeners: [any Channel] = []
        var connections: [ObjectIdentifier: any Channel] = [:]
        var isShutDown = false
    }

    private let state = Mutex(State())

    var connectionCount: Int { state.withLock { $0.connections.count } }
    var isShutDown: Bool { state.withLock { $0.isShutDown } }

    /// Records a new connection until it closes; false once the server is shut down.
    func track(_ channel: any Channel) -> Bool {
        let id = ObjectIdentifier(channel)
        let accepted = state.withLock { s in
            guard !s.isShutDown else { return false }
            s.connections[id] = channel
            return true
        }
        if accepted {
            channel.closeFuture.whenComplete { _ in
                _ = self.state.withLock { $0.connections.removeValue(forKey: id) }
            }
        }
        return accepted
    }

    func addListener(_ channel: any Channel) -> Bool {
        state.withLock { s in
            guard !s.isShutDown else { return false }
            s.listeners.append(channel)
            return true
        }
    }

    /// Marks the server shut down and hands back what to close; nil if it already was.
    func shutDown() -> ([any Channel], [any Channel])? {
        state.withLock { s in
            guard !s.isShutDown else { return nil }
            s.isShutDown = true
            defer {
                s.listeners = []
                s.connections = [:]
            }
            return (s.listeners, Array(s.connections.values))
        }
    }
}
