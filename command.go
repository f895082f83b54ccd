package vigthoria

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "vigthoria",
		Usage: "key add|list|show|update|revoke|rotate … | usage [<id>] | signing-key rotate|list",
		Short: "Manages the client keys of the vigthoria handler",
		Long: `
Adds, lists, revokes and rotates the client keys that the vigthoria handler
accepts, and prints their usage, through the admin API of the running Caddy,
as caddy reload does: its key store, the one the handler uses, and every
change applies to requests when the command returns.

  caddy vigthoria key add --tier pro --name alice [--expires 720h] [--mint free,basic] [--force] [settings]
  caddy vigthoria key list
  caddy vigthoria key show <id> [--config Caddyfile]
  caddy vigthoria key update <id> [settings] [--clear-<setting>…]
  caddy vigthoria key revoke <id>
  caddy vigthoria key rotate <id>
  caddy vigthoria usage [<id>] [--month 2026-11 | --day 2026-12-01] [--json]

--address is the admin API's address (default: the admin address of the
config given with --config, else localhost:2019). add refuses a tier (or
a --mint tier) that no loaded config has, since its requests would be
refused; --force stores it anyway. When several key stores are open,
--store chooses one of them.

--store without --address works on the store directly, offline, with
no Caddy running: sqlite:PATH or redis://HOST:PORT/DB, as in the
Caddyfile. A running Caddy then sees each change within a second. Offline
the tier is not checked against a running config; give --config to check
it against that config's tiers. Run the command as the user Caddy runs
as (sudo -u caddy caddy vigthoria …): a new SQLite file is readable by
its owner only, and one made by root cannot be opened by a Caddy running
as another user.

A key's own settings replace its tier's of the same name; those it does
not set follow the tier, and its changes:

  --requests 100/1m   --tokens 200000/1m   --concurrent 5
  --quota 10000000/month   --budget 50/month   --max-tokens 2048
  --models 'vigthoria-fast-*'   --origins https://app.example.com

--origins binds the key to the web pages of those origins: a request with
another Origin header is refused with 403. update changes the settings
given and --clear-<setting> makes one follow the tier again; show prints
each setting and where it comes from, the tier's values taken from the
Caddyfile given with --config.

--mint lets the key's holder, an app's backend, mint short-lived tokens of
those tiers for its own users (POST /vigthoria/tokens).

usage prints the ledger's rows of a month or a day (UTC), with the keys'
names; --json prints them as JSON. usage of mint:<key ID>:<user> prints one
minted token user's rows; a minting key's own rows hold its users' usage.

Minted tokens are signed with a signing key in the same store, which every
instance sharing the store verifies:

  caddy vigthoria signing-key rotate [--store spec]
  caddy vigthoria signing-key list [--store spec]

rotate adds a new signing key, which every running Caddy signs with once it
has been published for 2 seconds, so that every instance knows it first;
tokens signed with the older ones stay valid until they expire. It also
removes the keys retired more than 24 hours ago (the longest life of a
token). list shows the keys' IDs and states, never the private keys.
The signing-key commands work on the store directly (default:
sqlite:<Caddy data dir>/vigthoria/vigthoria.db of the calling user).

A key's secret is printed once, by add and rotate, and is stored nowhere: the
store keeps only its SHA-256.
`,
		CobraFunc: buildCommand,
	})
}

// RunCLI runs `caddy vigthoria` with args (those after "vigthoria"),
// printing to stdout and stderr, and returns the exit status.
func RunCLI(args []string, stdout, stderr io.Writer) int {
	cmd := &cobra.Command{Use: "vigthoria", SilenceErrors: true}
	buildCommand(cmd)
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	if err := cmd.Execute(); err != nil {
		fmt.Fprintf(stderr, "Error: %v\n", err)
		return 1
	}
	return 0
}

// buildCommand adds the subcommands and flags to the vigthoria command.
func buildCommand(cmd *cobra.Command) {
	cmd.PersistentFlags().String("address", "",
		"the admin API of the running Caddy (default: that of --config, else "+caddy.DefaultAdminListen+")")
	cmd.PersistentFlags().String("config", "",
		"the config (Caddyfile, or JSON by its extension) of the running Caddy: its admin address, and the tiers for key show, and for key add with --store")
	cmd.PersistentFlags().String("store", "",
		"work on this key store directly, offline, not through a running Caddy: sqlite:PATH or redis://HOST:PORT/DB; with --address, that store of the Caddy there")

	// Runnable, so that a mistyped subcommand is an error rather than
	// the help.
	help := func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	cmd.Args, cmd.RunE = cobra.NoArgs, help
	key := &cobra.Command{
		Use:   "key",
		Short: "Adds, lists, revokes and rotates client keys",
		Args:  cobra.NoArgs,
		RunE:  help,
	}
	add := &cobra.Command{
		Use:   "add --tier <tier> --name <name> [--expires <duration>] [--mint <tier>,…]",
		Short: "Creates a key and prints its secret, once",
		Args:  cobra.NoArgs,
		RunE:  cliAdd,
	}
	add.Flags().String("tier", "", "the key's tier, as configured in the Caddyfile (required)")
	add.Flags().String("name", "", "who or what the key is for (required)")
	add.Flags().String("expires", "", "lifetime, such as 720h or 30d, or an RFC 3339 time (default: never)")
	add.Flags().String("mint", "", "tiers, separated by commas, that the key may mint tokens of for its users (default: none)")
	add.Flags().Bool("force", false, "store the key even though no loaded config has its tier (or a --mint tier)")
	addSettingFlags(add, false)
	_ = add.MarkFlagRequired("tier")
	_ = add.MarkFlagRequired("name")
	update := &cobra.Command{
		Use:   "update <id> [--<setting> <value>…] [--clear-<setting>…]",
		Short: "Changes a key's own settings; a cleared one follows the tier again",
		Args:  cobra.ExactArgs(1),
		RunE:  cliUpdate,
	}
	addSettingFlags(update, true)
	show := &cobra.Command{
		Use:   "show <id> [--config <Caddyfile>]",
		Short: "Prints a key and each of its settings, and whether it is the key's own or its tier's",
		Args:  cobra.ExactArgs(1),
		RunE:  cliShow,
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "Lists the keys, never their secrets",
		Args:  cobra.NoArgs,
		RunE:  cliList,
	}
	revoke := &cobra.Command{
		Use:   "revoke <id>",
		Short: "Revokes a key for good",
		Args:  cobra.ExactArgs(1),
		RunE:  cliRevoke,
	}
	rotate := &cobra.Command{
		Use:   "rotate <id>",
		Short: "Gives a key a new secret, printed once; the old one stops working",
		Args:  cobra.ExactArgs(1),
		RunE:  cliRotate,
	}
	usage := &cobra.Command{
		Use:   "usage [<id>] [--month YYYY-MM | --day YYYY-MM-DD] [--json]",
		Short: "Prints what keys used in a month (default: this one) or on a day, by day and model, with their names",
		Args:  cobra.MaximumNArgs(1),
		RunE:  cliUsage,
	}
	usage.Flags().String("month", "", "the month (UTC) to print, YYYY-MM (default: this month)")
	usage.Flags().String("day", "", "the day (UTC) to print, YYYY-MM-DD")
	usage.Flags().Bool("json", false, "print a JSON array of rows, as GET /vigthoria/usage answers")
	signing := &cobra.Command{
		Use:   "signing-key",
		Short: "Rotates and lists the keys that minted tokens are signed with",
		Args:  cobra.NoArgs,
		RunE:  help,
	}
	signingRotate := &cobra.Command{
		Use:   "rotate",
		Short: "Adds a signing key to sign with, and removes keys retired more than a day ago",
		Args:  cobra.NoArgs,
		RunE:  cliSigningRotate,
	}
	signingList := &cobra.Command{
		Use:   "list",
		Short: "Lists the signing keys, never their private keys",
		Args:  cobra.NoArgs,
		RunE:  cliSigningList,
	}
	for _, c := range []*cobra.Command{add, update, show, list, revoke, rotate, usage, signingRotate, signingList} {
		c.SilenceUsage = true // a failed command says why; the usage would bury it
	}
	key.AddCommand(add, update, show, list, revoke, rotate)
	signing.AddCommand(signingRotate, signingList)
	cmd.AddCommand(key, usage, signing)
}

// cliStore opens the store of the --store flag for the signing-key
// commands, which have no admin route: by default the SQLite store in
// the calling user's Caddy data directory. Only create makes a new
// SQLite file.
func cliStore(cmd *cobra.Command, create bool) (store.Backend, string, error) {
	spec, err := cmd.Flags().GetString("store")
	if err != nil {
		return nil, "", err
	}
	if spec == "" {
		spec = "sqlite:" + store.DefaultSQLitePath()
	}
	return openStore(cmd, spec, create)
}

// applied says when a change made through t applies to requests.
func applied(t *keyTarget) string {
	if t.online() {
		return "It applies to requests now."
	}
	return "A running Caddy applies it within a second."
}

func cliAdd(cmd *cobra.Command, _ []string) error {
	var a createAttrs
	a.Tier, _ = cmd.Flags().GetString("tier")
	a.Name, _ = cmd.Flags().GetString("name")
	a.Expires, _ = cmd.Flags().GetString("expires")
	a.Force, _ = cmd.Flags().GetBool("force")
	if mint, _ := cmd.Flags().GetString("mint"); mint != "" {
		a.Mint = strings.Split(mint, ",")
	}
	if _, err := parseExpiry(a.Expires, time.Now()); err != nil {
		return err
	}
	var settings policy.Settings
	if err := settingsFromFlags(cmd, &settings); err != nil {
		return err
	}
	t, err := cliTarget(cmd, true)
	if err != nil {
		return err
	}
	defer t.close()
	config, _ := cmd.Flags().GetString("config")
	k, err := t.createKey(cmd.Context(), a, settings, config)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Created key %s (name %q, tier %s, expires %s, mints %s, own settings %s) in %s. %s\n", k.ID, k.Name, k.Tier,
		formatTime(deref(k.Expires), "never"), formatMint(k.Mint, "no tokens"), setNames(k.Settings, "none"), t.name, applied(t))
	if !t.online() && config == "" && !a.Force {
		fmt.Fprintln(cmd.ErrOrStderr(), "Note: with --store, the tier is not checked against the running config; give --config to check it.")
	}
	printSecret(out, k.Secret)
	return nil
}

func cliList(cmd *cobra.Command, _ []string) error {
	t, err := cliTarget(cmd, false)
	if err != nil {
		return err
	}
	defer t.close()
	infos, err := t.listKeys(cmd.Context())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if len(infos) == 0 {
		fmt.Fprintf(out, "No keys in %s.\n", t.name)
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	// SETTINGS names the key's own settings (see key show).
	fmt.Fprintln(tw, "ID\tNAME\tTIER\tMINT\tCREATED\tEXPIRES\tLAST USED\tSTATE\tSETTINGS")
	for _, k := range infos {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, printable(k.Name), printable(k.Tier), formatMint(k.Mint, "-"),
			formatTime(k.Created, "-"), formatTime(deref(k.Expires), "never"), formatTime(deref(k.LastUsed), "never"), k.State, setNames(k.Settings, "-"))
	}
	return tw.Flush()
}

func cliRevoke(cmd *cobra.Command, args []string) error {
	t, err := cliTarget(cmd, false)
	if err != nil {
		return err
	}
	defer t.close()
	if err := t.revokeKey(cmd.Context(), args[0]); err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "Revoked key %s. %s\n", args[0], applied(t))
	return nil
}

// cliUsage prints the ledger's rows of a month or a day (UTC; default
// this month): of one key, or of every key in the store. Offline, the
// last second of use may still be on its way from a running Caddy;
// through the admin API, Caddy writes it first.
func cliUsage(cmd *cobra.Command, args []string) error {
	month, _ := cmd.Flags().GetString("month")
	day, _ := cmd.Flags().GetString("day")
	asJSON, _ := cmd.Flags().GetBool("json")
	from, to, err := usageFlags(month, day, time.Now())
	if err != nil {
		return err
	}
	t, err := cliTarget(cmd, false)
	if err != nil {
		return err
	}
	defer t.close()
	var id string
	if len(args) > 0 {
		id = args[0]
	}
	lines, err := t.usage(cmd.Context(), id, from, to)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(lines)
	}
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
	// CACHED is of PROMPT and REASONING of COMPLETION, where the
	// upstream reported them. COST is in units of the proxy's currency,
	// which the store does not know: 0 for usage of unpriced models. NAME
	// comes last: the columns before it are those of before, and a name
	// may hold spaces.
	fmt.Fprintln(w, "KEY\tDAY\tMODEL\tREQUESTS\tPROMPT\tCACHED\tCOMPLETION\tREASONING\tTOTAL\tCOST\tNAME")
	for _, r := range lines {
		name := printable(r.Name)
		if r.Name == "" {
			name = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", printable(r.Key), r.Day, printable(r.Model), r.Requests,
			r.PromptTokens, r.CachedTokens, r.CompletionTokens, r.ReasoningTokens, r.TotalTokens, policy.FormatCost(r.CostMicros), name)
	}
	return w.Flush()
}

// usageFlags returns the range of days of --month (YYYY-MM) or --day
// (YYYY-MM-DD), this month at now if neither. Errors wrap ErrInvalid.
func usageFlags(month, day string, now time.Time) (from, to string, err error) {
	switch {
	case month != "" && day != "":
		return "", "", fmt.Errorf("%w: give --month or --day, not both", store.ErrInvalid)
	case day != "":
		return usageRange(day, day, now)
	case month != "":
		m, err := time.Parse("2006-01", month)
		if err != nil {
			return "", "", fmt.Errorf("%w: --month '%s' is not YYYY-MM", store.ErrInvalid, month)
		}
		return usageRange(store.Day(m), store.Day(m.AddDate(0, 1, -1)), now)
	}
	return usageRange("", "", now)
}

// printable returns s as it is when every character of it prints as
// itself, and quoted with escapes otherwise: a name that a caller or an
// upstream chose must not forge rows or move the terminal's cursor.
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsGraphic(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

func cliRotate(cmd *cobra.Command, args []string) error {
	t, err := cliTarget(cmd, false)
	if err != nil {
		return err
	}
	defer t.close()
	secret, err := t.rotateKey(cmd.Context(), args[0])
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Rotated key %s: its old secret is refused. %s\n", args[0], applied(t))
	printSecret(out, secret)
	return nil
}

// cliSigningRotate adds a signing key and removes those retired more
// than MaxTokenTTL ago. It may make a new SQLite file, as key add does: a
// fleet's first signing key may come before its first client key.
func cliSigningRotate(cmd *cobra.Command, _ []string) error {
	st, spec, err := cliStore(cmd, true)
	if err != nil {
		return err
	}
	defer st.Close()
	k, removed, err := keys.RotateSigningKeys(cmd.Context(), st, time.Now())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Added signing key %s in %s: a running Caddy signs new tokens with it in 2 seconds.\n", k.ID, spec)
	fmt.Fprintf(out, "Signing keys removed (retired more than %g hours ago): %d.\n", keys.MaxTokenTTL.Hours(), removed)
	return nil
}

// cliSigningList prints the signing keys and their states: current (the
// one that signs), signs from a time (newer, published but not signing
// yet), retired at a time (still verifying the tokens it signed), or
// expired (no token it signed is valid any more; the next rotate
// removes it).
func cliSigningList(cmd *cobra.Command, _ []string) error {
	st, spec, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	signing, err := st.SigningKeys(cmd.Context())
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if len(signing) == 0 {
		fmt.Fprintf(out, "No signing keys in %s.\n", spec)
		return nil
	}
	now := time.Now()
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCREATED\tSTATE")
	current := keys.Signer(signing, now)
	for i, k := range signing {
		state := "current"
		switch retired := keys.Retired(signing, i); {
		case &signing[i] == current:
		case keys.ExpiredSigningKey(signing, i, now):
			state = "expired"
		case k.Created.After(current.Created):
			state = "signs from " + formatTime(k.Created.Add(keys.SigningGrace), "-")
		case !retired.IsZero():
			state = "retired " + formatTime(retired, "-")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", printable(k.ID), formatTime(k.Created, "-"), state)
	}
	return tw.Flush()
}

func printSecret(out io.Writer, secret string) {
	fmt.Fprintf(out, "\n    %s\n\n", secret)
	fmt.Fprintln(out, "This secret is shown only now and cannot be recovered: keep it safe.")
	fmt.Fprintln(out, "Clients send it as: Authorization: Bearer <secret>")
}

// parseExpiry reads an expiry: empty for never, a duration from now
// (720h, 30d), or an RFC 3339 time. Errors wrap ErrInvalid.
func parseExpiry(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil || d <= 0 {
		return time.Time{}, fmt.Errorf("%w: expiry '%s' is neither a positive duration (720h, 30d) nor an RFC 3339 time", store.ErrInvalid, s)
	}
	return now.Add(d), nil
}

// formatMint formats the tiers a key may mint tokens of, or none when
// it may mint none.
func formatMint(mint []string, none string) string {
	if len(mint) == 0 {
		return none
	}
	return store.JoinMint(mint)
}

// deref returns *t, or the zero time when t is nil.
func deref(t *time.Time) time.Time {
	if t == nil {
		return time.Time{}
	}
	return *t
}

// formatTime formats t for the key list, in UTC, or none when zero.
func formatTime(t time.Time, none string) string {
	if t.IsZero() {
		return none
	}
	return t.UTC().Format(time.RFC3339)
}
