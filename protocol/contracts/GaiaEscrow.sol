// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title The escrow of one Gaia domain.
/// @notice Users deposit for an account (the address of an access key); the domain's nodes
/// serve requests made with that key and are paid by redeeming cumulative vouchers the key
/// signed (EIP-712, bound to this chain and this contract). Each entry node that debits an
/// account keeps its own cumulative channel per payee (`entry`), so two entry nodes never
/// race on one counter. No more than an account holds is ever paid out of it. The operator registers the nodes that may be paid and takes a fixed
/// share of every payout. What an account has not spent goes back to its depositor once the
/// account has expired.
contract GaiaEscrow {
    /// One access key's funds.
    struct Account {
        /// Deposited and not yet paid out.
        uint256 balance;
        /// Who gets the remainder back (the last depositor).
        address refundTo;
        /// Unix time after which the remainder can be refunded and vouchers no longer redeemed.
        uint64 expiresAt;
    }

    /// The EIP-712 struct a payer's key signs: "pay `payee` up to `cumulativeAmount` in all for
    /// what was served through entry node `entry`".
    struct Voucher {
        address payer;
        address payee;
        address entry;
        uint256 cumulativeAmount;
        uint64 expiresAt;
    }

    bytes32 public constant VOUCHER_TYPEHASH = keccak256(
        "Voucher(address payer,address payee,address entry,uint256 cumulativeAmount,uint64 expiresAt)"
    );
    bytes32 private constant DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    /// secp256k1 order / 2: a higher `s` is the malleable twin of a valid signature.
    uint256 private constant HALF_ORDER =
        0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    /// The domain's operator: registers payees and receives its share.
    address public immutable operator;
    /// The operator's share of every payout, in basis points (1/10 000).
    uint16 public immutable operatorShareBps;
    /// How long a deposit keeps an account open, in seconds.
    uint64 public immutable lockSeconds;

    mapping(address => Account) public accounts;
    /// Nodes the operator admitted for payment.
    mapping(address => bool) public payees;
    /// What each (payee, entry) channel has been paid out of each account so far, indexed
    /// `[payer][payee][entry]` (a voucher must exceed it).
    mapping(address => mapping(address => mapping(address => uint256))) public redeemed;
    /// Paid out and not yet withdrawn, per recipient (payees and the operator).
    mapping(address => uint256) public withdrawable;

    event Deposited(address indexed payer, address indexed from, uint256 amount, uint256 balance, uint64 expiresAt);
    event PayeeSet(address indexed payee, bool allowed);
    /// The channel (payer, payee, entry) was paid `paid` (`operatorCut` of it to the operator)
    /// and has now been paid `redeemedAmount` in all.
    event Redeemed(
        address indexed payer,
        address indexed payee,
        address indexed entry,
        uint256 redeemedAmount,
        uint256 paid,
        uint256 operatorCut
    );
    event Refunded(address indexed payer, address indexed to, uint256 amount);
    event Withdrawn(address indexed to, uint256 amount);

    error NotOperator();
    error ZeroDeposit();
    error NotAPayee(address payee);
    error VoucherExpired(uint64 expiresAt);
    error BadSignature();
    error NotNewer(uint256 cumulativeAmount, uint256 alreadyRedeemed);
    error OverBalance(uint256 due, uint256 balance);
    error OverVoucher(uint256 upTo, uint256 cumulativeAmount);
    error NotExpired(uint64 expiresAt);
    error NothingToPay();
    error TransferFailed();

    constructor(uint16 shareBps, uint64 lock) {
        require(shareBps <= 10_000, "share above 100%");
        operator = msg.sender;
        operatorShareBps = shareBps;
        lockSeconds = lock;
    }

    /// The EIP-712 domain separator: binds vouchers to this chain and this contract.
    function domainSeparator() public view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("GaiaEscrow"), keccak256("2"), block.chainid, address(this))
        );
    }

    /// The digest `payer` signs for `voucher`.
    function voucherDigest(Voucher calldata voucher) public view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(
                VOUCHER_TYPEHASH,
                voucher.payer,
                voucher.payee,
                voucher.entry,
                voucher.cumulativeAmount,
                voucher.expiresAt
            )
        );
        return keccak256(abi.encodePacked(hex"1901", domainSeparator(), structHash));
    }

    /// Adds the value sent to `payer`'s account and keeps it open for `lockSeconds` more.
    function deposit(address payer) external payable {
        if (msg.value == 0) revert ZeroDeposit();
        Account storage account = accounts[payer];
        account.balance += msg.value;
        account.refundTo = msg.sender;
        uint64 until = uint64(block.timestamp) + lockSeconds;
        if (until > account.expiresAt) account.expiresAt = until;
        emit Deposited(payer, msg.sender, msg.value, account.balance, account.expiresAt);
    }

    /// Admits (or removes) a node for payment.
    function setPayee(address payee, bool allowed) external {
        if (msg.sender != operator) revert NotOperator();
        payees[payee] = allowed;
        emit PayeeSet(payee, allowed);
    }

    /// Pays `voucher.payee` what the voucher adds to what its channel was already paid from the
    /// payer's account, less the operator's share. A voucher that asks more than the account
    /// holds is refused (`OverBalance`); its payee can take what is there with `redeemPart`.
    /// Anyone may submit it; the money only goes to the payee and the operator.
    function redeem(Voucher calldata voucher, bytes calldata signature) external {
        pay(voucher, signature, voucher.cumulativeAmount);
    }

    /// Pays the voucher's channel up to `upTo` (at most the voucher's amount) in all: for a
    /// voucher the account cannot cover in full (entry nodes together debited more than it
    /// held), the payee takes what is there and redeems the rest after a top-up.
    function redeemPart(Voucher calldata voucher, bytes calldata signature, uint256 upTo) external {
        if (upTo > voucher.cumulativeAmount) revert OverVoucher(upTo, voucher.cumulativeAmount);
        pay(voucher, signature, upTo);
    }

    function pay(Voucher calldata voucher, bytes calldata signature, uint256 upTo) private {
        if (!payees[voucher.payee]) revert NotAPayee(voucher.payee);
        if (block.timestamp > voucher.expiresAt) revert VoucherExpired(voucher.expiresAt);
        if (recover(voucherDigest(voucher), signature) != voucher.payer) revert BadSignature();
        uint256 already = redeemed[voucher.payer][voucher.payee][voucher.entry];
        if (upTo <= already) revert NotNewer(upTo, already);
        Account storage account = accounts[voucher.payer];
        if (block.timestamp > account.expiresAt) revert VoucherExpired(account.expiresAt);
        uint256 due = upTo - already;
        if (due > account.balance) revert OverBalance(due, account.balance);
        redeemed[voucher.payer][voucher.payee][voucher.entry] = upTo;
        account.balance -= due;
        uint256 cut = (due * operatorShareBps) / 10_000;
        withdrawable[operator] += cut;
        withdrawable[voucher.payee] += due - cut;
        emit Redeemed(voucher.payer, voucher.payee, voucher.entry, upTo, due, cut);
    }

    /// Returns an expired account's remainder to its depositor.
    function refund(address payer) external {
        Account storage account = accounts[payer];
        if (block.timestamp <= account.expiresAt) revert NotExpired(account.expiresAt);
        uint256 amount = account.balance;
        if (amount == 0) revert NothingToPay();
        account.balance = 0;
        send(account.refundTo, amount);
        emit Refunded(payer, account.refundTo, amount);
    }

    /// Sends the caller what it has been paid.
    function withdraw() external {
        uint256 amount = withdrawable[msg.sender];
        if (amount == 0) revert NothingToPay();
        withdrawable[msg.sender] = 0;
        send(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    function send(address to, uint256 amount) private {
        (bool ok,) = payable(to).call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    /// The signer of `digest`: 65 bytes `r || s || v`, low `s`, `v` in {27, 28} (or {0, 1}).
    function recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) revert BadSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        if (uint256(s) > HALF_ORDER || (v != 27 && v != 28)) revert BadSignature();
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert BadSignature();
        return signer;
    }
}
