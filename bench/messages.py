"""The benchmark's load: a realistic ~20 KB French order confirmation, and a multipart/signed twin.

Deterministic (fixed seed), CRLF line endings, quoted-printable like Symfony Mailer or PHPMailer send.
``with_message_id`` gives each probe message its own Message-ID so the sink can match arrivals.
"""

from __future__ import annotations

import base64
import quopri
import random
import re

FROM = "commandes@maison-lumiere.example"
TO = "camille.durand@example.org"

_PRODUCTS = [
    ("Bougie parfumée Figuier & Cassis – 180 g", "BF180", 19.00),
    ("Diffuseur en rotin « Soir d’été » – 100 ml", "DR100", 34.50),
    ("Savon surgras au lait d’ânesse", "SL075", 6.90),
    ("Coffret découverte : 4 mini-bougies", "CD004", 42.00),
    ("Brume d’oreiller Lavande fine – 75 ml", "BO075", 16.00),
    ("Plaid en laine mérinos – Écru", "PL140", 129.00),
    ("Mèches en coton naturel (lot de 10)", "MC010", 4.50),
    ("Photophore en verre soufflé – Ambre", "PV012", 24.00),
]


def _euros(x: float) -> str:
    return f"{x:,.2f}".replace(",", " ").replace(".", ",") + "\u00a0€"


def _html(n_items: int) -> str:
    rows = []
    total = 0.0
    for i in range(n_items):
        name, ref, price = _PRODUCTS[i % len(_PRODUCTS)]
        qty = 1 + (i * 7) % 3
        total += qty * price
        rows.append(
            f"""<tr>
  <td style="padding:8px 0;border-bottom:1px solid #eee8e0;width:64px">
    <img src="https://cdn.maison-lumiere.example/produits/{ref.lower()}-{i}.jpg" width="56" height="56"
         alt="{name}" style="display:block;border-radius:4px">
  </td>
  <td style="padding:8px 12px;border-bottom:1px solid #eee8e0;font-size:14px;color:#3b3129">
    <a href="https://www.maison-lumiere.example/produit/{ref.lower()}-{i}?utm_source=email&amp;utm_medium=transac"
       style="color:#3b3129;text-decoration:none">{name}</a><br>
    <span style="color:#8a7f74;font-size:12px">Réf. {ref}-{i} · Quantité : {qty}</span>
  </td>
  <td style="padding:8px 0;border-bottom:1px solid #eee8e0;text-align:right;font-size:14px">
    {_euros(qty * price)}</td>
</tr>"""
        )
    shipping = 0.0 if total > 60 else 4.90
    return f"""<!DOCTYPE html>
<html lang="fr"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Confirmation de votre commande n° 10452</title>
<style>
  body {{ margin:0; background:#f7f3ee; font-family: Georgia, 'Times New Roman', serif; }}
  .wrap {{ max-width:600px; margin:0 auto; background:#ffffff; }}
  .btn {{ background:#7a5c3e; color:#ffffff; padding:12px 22px; border-radius:3px; text-decoration:none; }}
  @media (max-width:480px) {{ .wrap {{ width:100% !important; }} }}
</style></head>
<body>
<table class="wrap" role="presentation" cellpadding="0" cellspacing="0" width="600" align="center">
<tr><td style="padding:24px 32px;border-bottom:3px solid #7a5c3e">
  <img src="https://cdn.maison-lumiere.example/email/logo.png" width="180" height="42" alt="Maison Lumière">
</td></tr>
<tr><td style="padding:28px 32px 8px 32px;font-size:15px;line-height:1.55;color:#3b3129">
  <h1 style="font-size:22px;font-weight:normal;margin:0 0 12px 0">Merci pour votre commande, Camille !</h1>
  <p>Nous avons bien reçu votre commande <strong>n° 10452</strong> du 14 octobre 2025 à 09 h 12.
  Elle est en cours de préparation dans notre atelier de Lyon ; vous recevrez un e-mail dès son expédition
  avec le lien de suivi Colissimo.</p>
  <p style="text-align:center;margin:24px 0">
    <a class="btn" href="https://www.maison-lumiere.example/compte/commandes/10452">Suivre ma commande</a></p>
</td></tr>
<tr><td style="padding:8px 32px">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0">
{chr(10).join(rows)}
</table>
</td></tr>
<tr><td style="padding:12px 32px;font-size:14px;color:#3b3129">
<table role="presentation" width="100%">
  <tr><td>Sous-total</td><td style="text-align:right">{_euros(total)}</td></tr>
  <tr><td>Livraison Colissimo (2 à 3 jours ouvrés)</td>
      <td style="text-align:right">{_euros(shipping) if shipping else "Offerte"}</td></tr>
  <tr><td><strong>Total TTC</strong></td>
      <td style="text-align:right"><strong>{_euros(total + shipping)}</strong></td></tr>
  <tr><td style="color:#8a7f74;font-size:12px">dont TVA 20 %</td>
      <td style="text-align:right;color:#8a7f74;font-size:12px">{_euros((total + shipping) / 6)}</td></tr>
</table></td></tr>
<tr><td style="padding:16px 32px;font-size:14px;line-height:1.5;color:#3b3129">
  <h2 style="font-size:16px;font-weight:normal">Adresse de livraison</h2>
  <p>Camille Durand<br>12, rue des Lilas<br>Bâtiment B, 3ᵉ étage<br>69004 Lyon<br>France</p>
  <h2 style="font-size:16px;font-weight:normal">Paiement</h2>
  <p>Carte bancaire Visa se terminant par 4242 — débitée à l’expédition.</p>
</td></tr>
<tr><td style="padding:20px 32px;background:#f7f3ee;font-size:12px;line-height:1.5;color:#8a7f74">
  <p>Une question ? Notre service client vous répond du lundi au vendredi de 9 h à 18 h au
  04 72 00 00 00 ou à <a href="mailto:aide@maison-lumiere.example">aide@maison-lumiere.example</a>.</p>
  <p>Vous disposez d’un délai de rétractation de 14 jours à compter de la réception de votre colis
  (articles 221-18 et suivants du Code de la consommation). Conditions générales de vente :
  <a href="https://www.maison-lumiere.example/cgv">www.maison-lumiere.example/cgv</a>.</p>
  <p>Maison Lumière SAS · 8, quai Saint-Vincent, 69001 Lyon · RCS Lyon 000 000 000 ·
  TVA FR00 000000000</p>
</td></tr>
</table>
</body></html>
"""


def _text(html: str) -> str:
    text = re.sub(r"<(style|head)[^>]*>.*?</\1>", "", html, flags=re.S)
    text = re.sub(r"<br>|</p>|</tr>|</h[12]>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("&amp;", "&")
    return "\n".join(line.strip() for line in text.splitlines() if line.strip()) + "\n"


def _qp(text: str) -> bytes:
    body = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _alternative(html: str, boundary: str) -> bytes:
    return (
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode() + _qp(_text(html)) + (
        f"\r\n--{boundary}\r\n"
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode() + _qp(html) + f"\r\n--{boundary}--\r\n".encode()


def _headers(extra: str = "") -> bytes:
    return (
        "Message-ID: <10452.1760425964.9f8e7d6c@maison-lumiere.example>\r\n"
        "Date: Tue, 14 Oct 2025 09:12:44 +0200\r\n"
        "Subject: =?utf-8?Q?Confirmation_de_votre_commande_n=C2=B0_10452?=\r\n"
        "From: =?utf-8?Q?Maison_Lumi=C3=A8re?= <commandes@maison-lumiere.example>\r\n"
        "To: Camille Durand <camille.durand@example.org>\r\n"
        "Reply-To: Service client <aide@maison-lumiere.example>\r\n"
        "X-Shop-Order: 10452\r\n"
        "X-Relay-Kind: order_confirmation\r\n"
        "X-Mailer: Symfony Mailer\r\n"
        "MIME-Version: 1.0\r\n" + extra
    ).encode()


def order_confirmation(target: int = 20_000) -> bytes:
    """multipart/alternative (text + HTML), about ``target`` bytes on the wire."""
    n = 4
    while True:
        html = _html(n)
        b = "_=_swift_1760425964_9f8e7d6c5b4a_=_"
        msg = _headers(f'Content-Type: multipart/alternative; boundary="{b}"\r\n\r\n') + _alternative(html, b)
        if len(msg) >= target or n > 200:
            return msg
        n += 1


def signed_order_confirmation(target: int = 20_000) -> bytes:
    """The same confirmation inside multipart/signed (S/MIME): the rewrap must forward it unchanged."""
    inner_b = "_=_swift_inner_1760425964_=_"
    outer_b = "----=_smime_1760425964_5a4b3c2d"
    rnd = random.Random(10452)
    sig = base64.encodebytes(bytes(rnd.getrandbits(8) for _ in range(3000))).replace(b"\n", b"\r\n")
    n = 4
    while True:
        html = _html(n)
        inner = (
            f'Content-Type: multipart/alternative; boundary="{inner_b}"\r\n\r\n'.encode()
            + _alternative(html, inner_b)
        )
        body = (
            f"This is an S/MIME signed message\r\n\r\n--{outer_b}\r\n".encode() + inner
            + f"\r\n--{outer_b}\r\nContent-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'.encode()
            + sig + f"\r\n--{outer_b}--\r\n".encode()
        )
        msg = _headers(
            'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;\r\n'
            f' boundary="{outer_b}"\r\n\r\n'
        ) + body
        if len(msg) >= target or n > 200:
            return msg
        n += 1


_MID = re.compile(rb"^Message-ID:[^\r\n]*\r\n", re.IGNORECASE | re.MULTILINE)


def with_message_id(raw: bytes, mid: str) -> bytes:
    """``raw`` with its Message-ID replaced by ``<mid>``."""
    return _MID.sub(f"Message-ID: <{mid}>\r\n".encode().replace(b"\\", b"\\\\"), raw, count=1)


def for_smtp_source(raw: bytes) -> bytes:
    """smtp-source -F appends CRLF to every line itself: give it LF lines."""
    return raw.replace(b"\r\n", b"\n")


def invoice_with_pdf(total: int = 25_000_000) -> bytes:
    """The order confirmation with a PDF attachment (random bytes in a PDF shell), ``total`` bytes in all:
    the big-message case of issue 6 (peak RSS)."""
    b = "_=_swift_mixed_1760425964_=_"
    inner_b = "_=_swift_alt_1760425964_=_"
    head = _headers(f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n')
    head += f"--{b}\r\nContent-Type: multipart/alternative; boundary=\"{inner_b}\"\r\n\r\n".encode()
    head += _alternative(_html(4), inner_b) + b"\r\n"
    head += (
        f'--{b}\r\nContent-Type: application/pdf; name="facture-10452.pdf"\r\n'
        'Content-Disposition: attachment; filename="facture-10452.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = f"\r\n--{b}--\r\n".encode()
    pdf_size = (total - len(head) - len(tail)) * 57 // 78
    shell = b"%%PDF-1.7\n1 0 obj\n<< /Length %d >>\nstream\n" % pdf_size
    end = b"\nendstream\nendobj\n%%EOF\n"
    pdf = shell + random.Random(10452).randbytes(pdf_size - len(shell) - len(end)) + end
    enc = base64.b64encode(pdf)
    body = b"\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76))
    return head + body + tail
